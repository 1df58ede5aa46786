//! An S3 (or S3-compatible) store for the remote cache: the AWS environment, the shared AWS
//! files' static keys, `[cache] endpoint`, and client settings that fail fast.

use std::time::Duration;

use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::{BackoffConfig, ClientConfigKey, RetryConfig};

use crate::config::CacheSettings;

/// An S3 (or S3-compatible) store from the AWS environment, `[cache] endpoint` on top, with
/// client settings that fail fast: object_store's defaults wait minutes on a dead server.
pub(super) fn s3(
    url: &url::Url,
    settings: &CacheSettings,
    secrets: &mut Vec<String>,
) -> Result<object_store::aws::AmazonS3, String> {
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let mut builder = AmazonS3Builder::from_env()
        .with_url(url.as_str())
        .with_config(
            AmazonS3ConfigKey::Client(ClientConfigKey::ConnectTimeout),
            "2s",
        )
        .with_config(
            AmazonS3ConfigKey::Client(ClientConfigKey::ReadTimeout),
            "10s",
        )
        // A whole request (one object, one part) may take this long on a slow link.
        .with_config(AmazonS3ConfigKey::Client(ClientConfigKey::Timeout), "600s")
        .with_retry(RetryConfig {
            backoff: BackoffConfig {
                init_backoff: Duration::from_millis(50),
                max_backoff: Duration::from_millis(500),
                base: 2.0,
            },
            max_retries: 3,
            retry_timeout: Duration::from_secs(3),
        });
    let endpoint = settings
        .endpoint
        .clone()
        .or_else(|| env("AWS_ENDPOINT_URL"))
        .or_else(|| env("AWS_ENDPOINT"));
    if let Some(endpoint) = &endpoint {
        builder = builder.with_endpoint(endpoint);
        if endpoint.starts_with("http://") {
            builder = builder.with_allow_http(true);
        }
    }
    let profile = if env("AWS_ACCESS_KEY_ID").is_none() {
        profile::credentials()
    } else {
        None
    };
    if let Some(p) = &profile {
        builder = builder
            .with_access_key_id(&p.access_key_id)
            .with_secret_access_key(&p.secret_access_key);
        secrets.push(p.secret_access_key.clone());
        if let Some(token) = &p.session_token {
            builder = builder.with_token(token);
            secrets.push(token.clone());
        }
    }
    if env("AWS_REGION").is_none() && env("AWS_DEFAULT_REGION").is_none() {
        builder = builder.with_region(profile::region().unwrap_or_else(|| "us-east-1".into()));
    }
    secrets.extend(
        ["AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"]
            .iter()
            .filter_map(|k| env(k)),
    );
    secrets.retain(|s| s.len() >= 4);
    // Never `{:?}` the builder: its Debug prints the secret.
    builder.build().map_err(|e| {
        let mut msg = format!("cannot open the S3 remote: {e}");
        for s in secrets.iter() {
            msg = msg.replace(s.as_str(), "***");
        }
        msg
    })
}

/// The shared AWS files: `~/.aws/credentials` (or AWS_SHARED_CREDENTIALS_FILE) and
/// `~/.aws/config` (or AWS_CONFIG_FILE), profile AWS_PROFILE or `default`. Static keys only
/// (no SSO, no assume-role).
mod profile {
    pub struct Credentials {
        pub access_key_id: String,
        pub secret_access_key: String,
        pub session_token: Option<String>,
    }

    fn name() -> String {
        std::env::var("AWS_PROFILE")
            .ok()
            .filter(|p| !p.is_empty())
            .unwrap_or_else(|| "default".into())
    }

    fn file(var: &str, default: &str) -> Option<std::path::PathBuf> {
        match std::env::var_os(var) {
            Some(p) if !p.is_empty() => Some(p.into()),
            _ => std::env::var_os("HOME").map(|h| std::path::Path::new(&h).join(default)),
        }
    }

    /// The `key = value` pairs of section `[section]` of an INI file.
    pub(super) fn section(text: &str, section: &str) -> Vec<(String, String)> {
        let mut inside = false;
        let mut pairs = Vec::new();
        for line in text.lines() {
            let line = line.trim();
            if line.starts_with('#') || line.starts_with(';') || line.is_empty() {
                continue;
            }
            if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                inside = name.trim() == section;
                continue;
            }
            if inside {
                if let Some((k, v)) = line.split_once('=') {
                    pairs.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
                }
            }
        }
        pairs
    }

    fn get(pairs: &[(String, String)], key: &str) -> Option<String> {
        pairs
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
            .filter(|v| !v.is_empty())
    }

    pub fn credentials() -> Option<Credentials> {
        let path = file("AWS_SHARED_CREDENTIALS_FILE", ".aws/credentials")?;
        let text = std::fs::read_to_string(path).ok()?;
        let pairs = section(&text, &name());
        Some(Credentials {
            access_key_id: get(&pairs, "aws_access_key_id")?,
            secret_access_key: get(&pairs, "aws_secret_access_key")?,
            session_token: get(&pairs, "aws_session_token"),
        })
    }

    pub fn region() -> Option<String> {
        let path = file("AWS_CONFIG_FILE", ".aws/config")?;
        let text = std::fs::read_to_string(path).ok()?;
        let name = name();
        let section_name = if name == "default" {
            name
        } else {
            format!("profile {name}")
        };
        get(&section(&text, &section_name), "region")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profile_sections_parse() {
        let text = "[default]\naws_access_key_id = A\n# c\n[other]\nAWS_SECRET_ACCESS_KEY=S\n";
        assert_eq!(
            profile::section(text, "other"),
            vec![("aws_secret_access_key".to_string(), "S".to_string())]
        );
        assert_eq!(profile::section(text, "default").len(), 1);
    }
}
