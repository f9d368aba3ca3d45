//! Any text as a recipe file: parsing and validation refuse it or accept it, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shardpress_engine::Recipe;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = Recipe::from_toml(text, "fuzz.toml");
    }
});
