//! `s3://bucket/prefix` locations.

use std::fmt;
use std::str::FromStr;

use crate::error::StorageError;

const SCHEME: &str = "s3://";

/// A bucket and a key prefix: a "directory" in an object store.
///
/// `prefix` is either empty (the whole bucket) or ends with `/`; it never has empty, `.` or
/// `..` segments. [`S3Uri::parse`] establishes this; code that builds the struct by hand must
/// keep it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct S3Uri {
    /// Bucket name.
    pub bucket: String,
    /// Key prefix: `""` or ending with `/`.
    pub prefix: String,
}

impl S3Uri {
    /// Parses `s3://bucket` or `s3://bucket/some/prefix` (a trailing `/` is optional).
    pub fn parse(uri: &str) -> Result<Self, StorageError> {
        let bad = |problem: String| StorageError::InvalidUri {
            uri: uri.to_string(),
            problem,
        };
        let rest = match uri.get(..SCHEME.len()) {
            Some(head) if head.eq_ignore_ascii_case(SCHEME) => &uri[SCHEME.len()..],
            _ => {
                return Err(bad(match uri.find("://") {
                    Some(at) => format!(
                        "scheme must be s3:// (got {:?}); expected s3://bucket/prefix",
                        &uri[..at + 3]
                    ),
                    None => "not an S3 URI; expected s3://bucket/prefix".to_string(),
                }))
            }
        };
        let (bucket, prefix) = match rest.split_once('/') {
            Some((bucket, prefix)) => (bucket, prefix),
            None => (rest, ""),
        };
        check_bucket(bucket).map_err(bad)?;
        let prefix = normalize_prefix(prefix).map_err(bad)?;
        Ok(Self {
            bucket: bucket.to_string(),
            prefix,
        })
    }

    /// Builds a URI from a bucket and a prefix, validating both like [`S3Uri::parse`].
    pub fn new(bucket: &str, prefix: &str) -> Result<Self, StorageError> {
        Self::parse(&format!("{SCHEME}{bucket}/{prefix}"))
    }

    /// The full key of `rel`, a path relative to the prefix.
    pub fn key(&self, rel: &str) -> String {
        format!("{}{rel}", self.prefix)
    }

    /// The URI of the "subdirectory" `rel` below this one.
    pub fn join(&self, rel: &str) -> Result<Self, StorageError> {
        Self::parse(&format!("{self}{rel}"))
    }

    /// Whether the two locations share objects: the same bucket, and one prefix is a prefix
    /// of the other (so writing to one could overwrite or be listed as part of the other).
    pub fn overlaps(&self, other: &S3Uri) -> bool {
        self.bucket == other.bucket
            && (self.prefix.starts_with(&other.prefix) || other.prefix.starts_with(&self.prefix))
    }
}

impl fmt::Display for S3Uri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{SCHEME}{}/{}", self.bucket, self.prefix)
    }
}

impl FromStr for S3Uri {
    type Err = StorageError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// Checks the S3 bucket naming rules for general-purpose buckets.
fn check_bucket(bucket: &str) -> Result<(), String> {
    if bucket.is_empty() {
        return Err("bucket name is empty; expected s3://bucket/prefix".into());
    }
    let problem = if !(3..=63).contains(&bucket.len()) {
        Some(format!(
            "must be 3 to 63 characters long, not {}",
            bucket.len()
        ))
    } else if let Some(c) = bucket
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '.' || *c == '-'))
    {
        Some(format!(
            "may only contain lowercase letters, digits, '.' and '-' (found {c:?})"
        ))
    } else if !bucket.starts_with(|c: char| c.is_ascii_alphanumeric())
        || !bucket.ends_with(|c: char| c.is_ascii_alphanumeric())
    {
        Some("must begin and end with a letter or digit".into())
    } else if bucket.contains("..") {
        Some("must not contain two adjacent periods".into())
    } else if bucket.parse::<std::net::Ipv4Addr>().is_ok() {
        Some("must not be formatted as an IP address".into())
    } else if bucket.starts_with("xn--") {
        Some("must not start with \"xn--\"".into())
    } else if bucket.ends_with("-s3alias") || bucket.ends_with("--ol-s3") {
        Some("must not end with \"-s3alias\" or \"--ol-s3\"".into())
    } else {
        None
    };
    match problem {
        Some(p) => Err(format!("bucket name {bucket:?} {p}")),
        None => Ok(()),
    }
}

/// Validates the key prefix and gives it a trailing `/` unless empty.
fn normalize_prefix(prefix: &str) -> Result<String, String> {
    if prefix.is_empty() {
        return Ok(String::new());
    }
    if let Some(c) = prefix.chars().find(|c| c.is_control()) {
        return Err(format!("prefix contains the control character {c:?}"));
    }
    let trimmed = prefix.strip_suffix('/').unwrap_or(prefix);
    for segment in trimmed.split('/') {
        match segment {
            "" => {
                return Err(format!(
                    "prefix {prefix:?} has an empty path segment (\"//\" or a leading \"/\")"
                ))
            }
            "." | ".." => {
                return Err(format!(
                    "prefix {prefix:?} has a {segment:?} segment; relative segments are not allowed"
                ))
            }
            _ => {}
        }
    }
    Ok(format!("{trimmed}/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problem(uri: &str) -> String {
        S3Uri::parse(uri).unwrap_err().to_string()
    }

    #[test]
    fn parses_and_normalizes() {
        let u = S3Uri::parse("s3://my-bucket/some/prefix").unwrap();
        assert_eq!(u.bucket, "my-bucket");
        assert_eq!(u.prefix, "some/prefix/");
        assert_eq!(u.to_string(), "s3://my-bucket/some/prefix/");
        assert_eq!(S3Uri::parse(&u.to_string()).unwrap(), u);
        assert_eq!(u.key("model.safetensors"), "some/prefix/model.safetensors");

        let root = S3Uri::parse("s3://bkt").unwrap();
        assert_eq!(root.prefix, "");
        assert_eq!(root.to_string(), "s3://bkt/");
        assert_eq!(S3Uri::parse("s3://bkt/").unwrap(), root);
        assert_eq!(root.key("a"), "a");

        assert_eq!(S3Uri::parse("s3://b.k-t/x/").unwrap().prefix, "x/");
        assert_eq!(
            root.join("out/run-1").unwrap().to_string(),
            "s3://bkt/out/run-1/"
        );
        assert_eq!("s3://bkt/a".parse::<S3Uri>().unwrap().prefix, "a/");
    }

    #[test]
    fn rejects_bad_uris() {
        assert!(problem("gs://bucket/x").contains("scheme must be s3://"));
        assert!(problem("bucket/x").contains("not an S3 URI"));
        assert!(problem("s3:///x").contains("bucket name is empty"));
        assert!(problem("s3://").contains("bucket name is empty"));
        assert!(problem("s3://My_Bucket/x").contains("lowercase letters"));
        assert!(problem("s3://ab/x").contains("3 to 63"));
        assert!(problem("s3://-abc/x").contains("begin and end"));
        assert!(problem("s3://a..b/x").contains("adjacent periods"));
        assert!(problem("s3://192.168.0.1/x").contains("IP address"));
        assert!(problem("s3://bkt/a/../b").contains("\"..\" segment"));
        assert!(problem("s3://bkt/..").contains("\"..\" segment"));
        assert!(problem("s3://bkt/a/./b").contains("\".\" segment"));
        assert!(problem("s3://bkt/a//b").contains("empty path segment"));
        assert!(problem("s3://bkt//a").contains("empty path segment"));
        // The message names the URI as given.
        assert!(problem("s3://bkt/a/../b").starts_with("s3://bkt/a/../b: "));
    }

    #[test]
    fn overlap() {
        let p = |s: &str| S3Uri::parse(s).unwrap();
        assert!(p("s3://b00/a/").overlaps(&p("s3://b00/a/b")));
        assert!(p("s3://b00/a/b").overlaps(&p("s3://b00/a")));
        assert!(p("s3://b00/a").overlaps(&p("s3://b00/a")));
        assert!(p("s3://b00").overlaps(&p("s3://b00/x")));
        assert!(!p("s3://b00/a").overlaps(&p("s3://b00/ab")));
        assert!(!p("s3://b00/a").overlaps(&p("s3://b01/a")));
    }
}
