//! Conversion between the recipe message and the engine's recipe file form.

use shardpress_engine::recipe::{RecipeFile, RuleFile};

use crate::v1::{RecipeRule, RecipeSpec};

impl From<&RecipeFile> for RecipeSpec {
    fn from(f: &RecipeFile) -> Self {
        RecipeSpec {
            name: f.name.clone(),
            description: f.description.clone(),
            has_ignore: f.ignore.is_some(),
            ignore: f.ignore.clone().unwrap_or_default(),
            ignore_1d: f.ignore_1d,
            rules: f
                .rules
                .iter()
                .map(|r| RecipeRule {
                    targets: r.targets.clone(),
                    action: r.action.clone(),
                    dtype: r.dtype.clone(),
                    bits: r.bits.map(u32::from),
                    symmetric: r.symmetric,
                    strategy: r.strategy.clone(),
                    group_size: r.group_size,
                    scale_dtype: r.scale_dtype.clone(),
                    observer: r.observer.clone(),
                })
                .collect(),
        }
    }
}

/// Converts a recipe message to the engine's form; `Err` names a field out of range.
pub fn recipe_file(spec: &RecipeSpec) -> Result<RecipeFile, String> {
    if !spec.has_ignore && !spec.ignore.is_empty() {
        return Err("ignore is set but has_ignore is false".into());
    }
    let rules = spec
        .rules
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let bits = match r.bits {
                None => None,
                Some(b) => Some(
                    u8::try_from(b)
                        .map_err(|_| format!("rule {}: bits must be 2, 4 or 8, got {b}", i + 1))?,
                ),
            };
            Ok(RuleFile {
                targets: r.targets.clone(),
                action: r.action.clone(),
                dtype: r.dtype.clone(),
                bits,
                symmetric: r.symmetric,
                strategy: r.strategy.clone(),
                group_size: r.group_size,
                scale_dtype: r.scale_dtype.clone(),
                observer: r.observer.clone(),
            })
        })
        .collect::<Result<Vec<_>, String>>()?;
    Ok(RecipeFile {
        name: spec.name.clone(),
        description: spec.description.clone(),
        ignore: spec.has_ignore.then(|| spec.ignore.clone()),
        ignore_1d: spec.ignore_1d,
        rules,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use shardpress_engine::recipe::{preset, PRESETS};

    #[test]
    fn presets_round_trip_through_the_message() {
        for (name, _) in PRESETS {
            let text = preset(name).expect("preset");
            let file: RecipeFile = toml::from_str(text).expect("toml");
            let spec = RecipeSpec::from(&file);
            assert_eq!(recipe_file(&spec).expect("back"), file, "{name}");
        }
    }

    #[test]
    fn out_of_range_bits_are_refused() {
        let spec = RecipeSpec {
            rules: vec![RecipeRule {
                targets: vec!["*".into()],
                action: "quantize".into(),
                bits: Some(300),
                ..Default::default()
            }],
            ..Default::default()
        };
        assert!(recipe_file(&spec).unwrap_err().contains("got 300"));
    }
}
