//! Built-in recipes, stored as the same TOML a user would write.

/// Name and TOML text of each preset.
pub const PRESETS: [(&str, &str); 11] = [
    ("bf16", include_str!("../../presets/bf16.toml")),
    ("fp16", include_str!("../../presets/fp16.toml")),
    ("w8a16", include_str!("../../presets/w8a16.toml")),
    ("w8a16-mse", include_str!("../../presets/w8a16-mse.toml")),
    ("w4a16", include_str!("../../presets/w4a16.toml")),
    ("w4a16-asym", include_str!("../../presets/w4a16-asym.toml")),
    ("w8a8", include_str!("../../presets/w8a8.toml")),
    ("fp8", include_str!("../../presets/fp8.toml")),
    ("sparse50", include_str!("../../presets/sparse50.toml")),
    ("2of4", include_str!("../../presets/2of4.toml")),
    ("2of4-w4a16", include_str!("../../presets/2of4-w4a16.toml")),
];

/// The TOML text of a preset.
pub fn preset(name: &str) -> Option<&'static str> {
    PRESETS.iter().find(|(n, _)| *n == name).map(|(_, t)| *t)
}

/// All preset names.
pub fn preset_names() -> Vec<&'static str> {
    PRESETS.iter().map(|(n, _)| *n).collect()
}
