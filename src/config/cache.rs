//! The `[cache]` table: a remote run cache shared by several workspaces (`remote`, `push`,
//! `required`, `endpoint`). Hashed nowhere and recorded nowhere: where results are shared
//! does not change them. Credentials never come from here (the AWS environment does), so a
//! URL carrying a user or password is refused without being echoed.

use super::source::{wrong_type, Entries, Entry, Source};
use super::CACHE_KEYS;
use crate::error::{suggestion, PipeError};

/// The `[cache]` table's values, defaults filled in.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CacheSettings {
    /// "s3://BUCKET/PREFIX" or "file:///ABS/PATH"; None: no remote (the local run cache only).
    pub remote: Option<String>,
    pub push: PushMode,
    /// A remote failure fails the run instead of a warning.
    pub required: bool,
    /// The S3 endpoint (an S3-compatible server); overrides AWS_ENDPOINT_URL.
    pub endpoint: Option<String>,
}

/// When a run's results go to the remote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum PushMode {
    /// After each stage that ran.
    #[default]
    Auto,
    /// Only on `fmnist-pipe push`.
    Manual,
}

pub(super) fn cache_settings(src: &Source, entries: &Entries) -> Result<CacheSettings, PipeError> {
    let mut settings = CacheSettings::default();
    for (key, entry) in entries {
        let at = entry.value_span.as_ref();
        let string = |expected: &str| {
            entry
                .value
                .as_str()
                .map(str::to_string)
                .ok_or_else(|| wrong_type(src, entry, "[cache]", key, expected))
        };
        match key.as_str() {
            "remote" => {
                let remote = string("a string (s3://BUCKET/PREFIX or file:///ABS/PATH)")?;
                check_remote(&remote)
                    .map_err(|e| src.error(at, format!("[cache] {e}{}", origin(entry))))?;
                settings.remote = Some(remote);
            }
            "push" => {
                settings.push = match string("a string (auto | manual)")?.as_str() {
                    "auto" => PushMode::Auto,
                    "manual" => PushMode::Manual,
                    other => {
                        return Err(src.error(
                            at,
                            format!(
                                "[cache] `push` must be auto or manual, not `{other}`{}",
                                origin(entry)
                            ),
                        ))
                    }
                };
            }
            "required" => {
                settings.required = entry
                    .value
                    .as_bool()
                    .ok_or_else(|| wrong_type(src, entry, "[cache]", key, "true or false"))?;
            }
            "endpoint" => {
                let endpoint = string("a string (http://HOST:PORT or https://HOST)")?;
                check_endpoint(&endpoint)
                    .map_err(|e| src.error(at, format!("[cache] {e}{}", origin(entry))))?;
                settings.endpoint = Some(endpoint);
            }
            other => {
                return Err(src.error(
                    entry.key_span.as_ref(),
                    format!(
                        "unknown key `{other}` in [cache]{}",
                        suggestion(other, CACHE_KEYS.iter().copied())
                    ),
                ))
            }
        }
    }
    Ok(settings)
}

fn origin(entry: &Entry) -> String {
    match &entry.from_override {
        Some(raw) => format!(" (from --set `{}`)", raw.split('=').next().unwrap_or(raw)),
        None => String::new(),
    }
}

/// Checks a `remote` URL; the message never repeats the URL (it might carry a secret).
pub fn check_remote(remote: &str) -> Result<(), String> {
    let url = url::Url::parse(remote).map_err(|e| {
        format!("`remote` is not a URL ({e}): write s3://BUCKET/PREFIX or file:///ABS/PATH")
    })?;
    if !url.username().is_empty() || url.password().is_some() {
        return Err(
            "`remote` must not carry credentials: set AWS_ACCESS_KEY_ID and \
                    AWS_SECRET_ACCESS_KEY in the environment (or ~/.aws/credentials) instead"
                .into(),
        );
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err("`remote` takes no ?query or #fragment".into());
    }
    match url.scheme() {
        "s3" | "s3a" => {
            if url.host_str().is_none_or(str::is_empty) {
                return Err("`remote` names no bucket: write s3://BUCKET/PREFIX".into());
            }
            Ok(())
        }
        "file" => {
            if url
                .host_str()
                .is_some_and(|h| !h.is_empty() && h != "localhost")
            {
                return Err(
                    "a file remote takes an absolute path: file:///ABS/PATH (three slashes)".into(),
                );
            }
            url.to_file_path()
                .map(|_| ())
                .map_err(|_| "a file remote takes an absolute path: file:///ABS/PATH".into())
        }
        "gs" | "az" | "azure" | "abfs" | "abfss" | "adl" => Err(format!(
            "`remote`: {}:// is not built into this fmnist-pipe (s3:// and file:// are; \
             object_store's gcp/azure features would add them)",
            url.scheme()
        )),
        other => Err(format!(
            "`remote`: unsupported scheme `{other}` (s3://BUCKET/PREFIX or file:///ABS/PATH)"
        )),
    }
}

/// Checks an `endpoint` URL (http or https, no credentials).
pub fn check_endpoint(endpoint: &str) -> Result<(), String> {
    let url = url::Url::parse(endpoint)
        .map_err(|e| format!("`endpoint` is not a URL ({e}): write http://HOST:PORT"))?;
    if !url.username().is_empty() || url.password().is_some() {
        return Err("`endpoint` must not carry credentials (use the AWS environment)".into());
    }
    match url.scheme() {
        "http" | "https" if url.host_str().is_some_and(|h| !h.is_empty()) => Ok(()),
        _ => Err("`endpoint` must be http://HOST[:PORT] or https://HOST[:PORT]".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remotes_s3_and_file_are_accepted() {
        for ok in [
            "s3://bucket",
            "s3://bucket/team/cache",
            "file:///srv/cache",
            "file://localhost/srv/cache",
        ] {
            assert_eq!(check_remote(ok), Ok(()), "{ok}");
        }
    }

    #[test]
    fn bad_remotes_say_why_without_echoing_secrets() {
        for (bad, why) in [
            ("bucket/prefix", "not a URL"),
            ("s3://AKIA:hunter2@bucket/p", "must not carry credentials"),
            ("file://relative/path", "absolute path"),
            ("gs://bucket/p", "not built into"),
            ("ftp://host/p", "unsupported scheme"),
            ("s3://bucket/p?x=1", "no ?query"),
        ] {
            let err = check_remote(bad).expect_err(bad);
            assert!(err.contains(why), "{bad}: {err}");
            assert!(!err.contains("hunter2"), "{err}");
        }
        assert!(check_endpoint("http://127.0.0.1:9000").is_ok());
        assert!(check_endpoint("https://s3.example.com").is_ok());
        let err = check_endpoint("http://k:hunter2@127.0.0.1:9000").unwrap_err();
        assert!(!err.contains("hunter2"), "{err}");
        assert!(check_endpoint("127.0.0.1:9000").is_err());
    }

    fn load(text: &str, sets: &[&str]) -> Result<super::super::Pipeline, String> {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pipeline.toml");
        std::fs::write(&file, text).unwrap();
        let overrides: Vec<super::super::Override> =
            sets.iter().map(|s| s.parse().unwrap()).collect();
        super::super::load(&file, &overrides, &crate::registry::Registry::default())
            .map_err(|e| e.to_string())
    }

    const STAGE: &str = "[stages.a]\ncmd = \"true\"\nouts = [\"a.txt\"]\n";

    #[test]
    fn the_table_loads_with_defaults_and_overrides() {
        let p = load(STAGE, &[]).unwrap();
        assert_eq!(p.cache, CacheSettings::default());
        let text = format!(
            "[cache]\nremote = \"s3://b/team\"\npush = \"manual\"\nrequired = true\n\
             endpoint = \"http://127.0.0.1:9000\"\n{STAGE}"
        );
        let p = load(&text, &[]).unwrap();
        assert_eq!(p.cache.remote.as_deref(), Some("s3://b/team"));
        assert_eq!(p.cache.push, PushMode::Manual);
        assert!(p.cache.required);
        assert_eq!(p.cache.endpoint.as_deref(), Some("http://127.0.0.1:9000"));
        let p = load(STAGE, &["cache.remote=file:///srv/x", "cache.push=auto"]).unwrap();
        assert_eq!(p.cache.remote.as_deref(), Some("file:///srv/x"));
        assert_eq!(p.cache.push, PushMode::Auto);
    }

    #[test]
    fn mistakes_point_at_their_line() {
        let text = format!("[cache]\nremote = \"s3://b\"\npush = \"sometimes\"\n{STAGE}");
        let err = load(&text, &[]).unwrap_err();
        assert!(
            err.contains("pipeline.toml:3:") && err.contains("auto or manual"),
            "{err}"
        );
        let err = load(&format!("[cache]\nremot = \"s3://b\"\n{STAGE}"), &[]).unwrap_err();
        assert!(
            err.contains(":2:") && err.contains("did you mean `remote`"),
            "{err}"
        );
        let err = load(&format!("[cache]\nrequired = \"yes\"\n{STAGE}"), &[]).unwrap_err();
        assert!(
            err.contains(":2:") && err.contains("true or false"),
            "{err}"
        );
        let err = load(STAGE, &["cache.remote=s3://AKIA:hunter2@b/p"]).unwrap_err();
        assert!(err.contains("must not carry credentials"), "{err}");
        assert!(!err.contains("hunter2"), "{err}");
        let err = load(&format!("[cahce]\nremote = \"s3://b\"\n{STAGE}"), &[]).unwrap_err();
        assert!(err.contains("did you mean `cache`"), "{err}");
    }
}
