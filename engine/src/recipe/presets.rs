//! Built-in recipes, stored as the same TOML a user would write.

/// Name, TOML text and one-line summary of each preset.
pub const PRESETS: [(&str, &str); 4] = [
    ("bf16", include_str!("../../presets/bf16.toml")),
    ("fp16", include_str!("../../presets/fp16.toml")),
    ("w8a16", include_str!("../../presets/w8a16.toml")),
    ("w4a16", include_str!("../../presets/w4a16.toml")),
];

/// The TOML text of a preset.
pub fn preset(name: &str) -> Option<&'static str> {
    PRESETS.iter().find(|(n, _)| *n == name).map(|(_, t)| *t)
}

/// All preset names.
pub fn preset_names() -> Vec<&'static str> {
    PRESETS.iter().map(|(n, _)| *n).collect()
}
