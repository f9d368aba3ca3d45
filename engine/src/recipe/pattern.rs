//! Tensor-name patterns: globs by default, regular expressions after a `re:` prefix.

use globset::{Glob, GlobMatcher};
use regex::Regex;

/// A compiled name pattern.
#[derive(Debug, Clone)]
pub enum Pattern {
    /// Shell-style glob where `*` also matches dots.
    Glob(String, GlobMatcher),
    /// Regular expression that must match the whole name.
    Regex(String, Regex),
}

impl Pattern {
    /// Compiles `text`; `re:` selects a regular expression, anything else is a glob.
    pub fn parse(text: &str) -> Result<Self, String> {
        if let Some(re) = text.strip_prefix("re:") {
            let anchored = format!("^(?:{re})$");
            Regex::new(&anchored)
                .map(|r| Pattern::Regex(text.to_string(), r))
                .map_err(|e| format!("invalid regex {re:?}: {e}"))
        } else {
            Glob::new(text)
                .map(|g| Pattern::Glob(text.to_string(), g.compile_matcher()))
                .map_err(|e| format!("invalid glob {text:?}: {e}"))
        }
    }

    /// Whether `name` matches.
    pub fn matches(&self, name: &str) -> bool {
        match self {
            Pattern::Glob(_, g) => g.is_match(name),
            Pattern::Regex(_, r) => r.is_match(name),
        }
    }

    /// The source text.
    pub fn as_str(&self) -> &str {
        match self {
            Pattern::Glob(s, _) | Pattern::Regex(s, _) => s,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_cross_dots_and_regexes_are_anchored() {
        let g = Pattern::parse("*.weight").expect("glob");
        assert!(g.matches("model.layers.0.mlp.up_proj.weight"));
        assert!(!g.matches("model.layers.0.mlp.up_proj.bias"));
        let r = Pattern::parse("re:.*layers\\.[0-3]\\..*").expect("regex");
        assert!(r.matches("model.layers.2.self_attn.q_proj.weight"));
        assert!(!r.matches("model.layers.12.self_attn.q_proj.weight"));
        assert!(Pattern::parse("re:(").is_err());
        assert!(Pattern::parse("a[").is_err());
    }
}
