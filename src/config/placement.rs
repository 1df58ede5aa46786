//! Where a stage runs: `[pipeline] executor`, and a stage's own `executor` and `resources`.
//! Recorded in the lock, never hashed: a result does not depend on where it was computed.

use serde::{Deserialize, Serialize};

/// Which runner carries a stage's work out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Executor {
    /// This machine: built-in kinds in-process, commands as local process groups.
    #[default]
    Local,
    /// One Slurm job per stage (`sbatch`), the engine staying on the submit host.
    Slurm,
}

impl std::str::FromStr for Executor {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "local" => Ok(Executor::Local),
            "slurm" => Ok(Executor::Slurm),
            other => Err(format!("executor `{other}` is not one of local, slurm")),
        }
    }
}

impl std::fmt::Display for Executor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Executor::Local => "local",
            Executor::Slurm => "slurm",
        })
    }
}

/// What a stage asks of a cluster (Slurm's `sbatch` options); the local runner ignores it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    /// CPUs for the job (`--cpus-per-task`).
    pub cpus: Option<u32>,
    /// Memory, e.g. "4G" or "512M" (`--mem`).
    pub mem: Option<String>,
    /// Wall-clock limit, e.g. "00:30:00" or "1-00:00:00" (`--time`).
    pub time: Option<String>,
    /// GPUs (`--gpus`).
    pub gpus: Option<u32>,
    pub partition: Option<String>,
    pub account: Option<String>,
    /// More `sbatch` options, each one argument starting with `--`.
    #[serde(default)]
    pub extra: Vec<String>,
}

impl Resources {
    /// Rules out values `sbatch` would refuse only once the job is submitted.
    pub fn check(&self) -> Result<(), String> {
        if self.cpus == Some(0) {
            return Err("resources.cpus must be at least 1".into());
        }
        if let Some(mem) = &self.mem {
            let digits = mem.trim_end_matches(['K', 'M', 'G', 'T']);
            let unit_count = mem.len() - digits.len();
            if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) || unit_count > 1 {
                return Err(format!(
                    "resources.mem `{mem}` is not a size like 512M or 4G"
                ));
            }
        }
        if let Some(time) = &self.time {
            if !valid_time(time) {
                return Err(format!(
                    "resources.time `{time}` is not a Slurm time (MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS)"
                ));
            }
        }
        for text in [&self.partition, &self.account].into_iter().flatten() {
            if text.is_empty() || text.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(format!(
                    "resources: `{text}` is not a partition or account name"
                ));
            }
        }
        if let Some(bad) = self
            .extra
            .iter()
            .find(|e| !e.starts_with("--") || e.contains(['\n', '\r']))
        {
            return Err(format!(
                "resources.extra `{bad}`: each entry is one sbatch option starting with `--`"
            ));
        }
        Ok(())
    }
}

/// Slurm's time formats: "M", "M:S", "H:M:S", "D-H", "D-H:M", "D-H:M:S".
fn valid_time(time: &str) -> bool {
    let number = |s: &str| !s.is_empty() && s.len() <= 6 && s.bytes().all(|b| b.is_ascii_digit());
    let (days, rest) = match time.split_once('-') {
        Some((d, rest)) => (Some(d), rest),
        None => (None, time),
    };
    if days.is_some_and(|d| !number(d)) {
        return false;
    }
    let parts: Vec<&str> = rest.split(':').collect();
    (1..=3).contains(&parts.len()) && parts.iter().all(|p| number(p))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn executor_names_parse_and_print() {
        assert_eq!("slurm".parse::<Executor>(), Ok(Executor::Slurm));
        assert_eq!(Executor::Local.to_string(), "local");
        assert!("pbs"
            .parse::<Executor>()
            .unwrap_err()
            .contains("local, slurm"));
    }

    #[test]
    fn resources_are_checked_before_submission() {
        let ok = Resources {
            cpus: Some(2),
            mem: Some("4G".into()),
            time: Some("00:30:00".into()),
            extra: vec!["--qos=short".into()],
            ..Resources::default()
        };
        assert_eq!(ok.check(), Ok(()));
        for time in ["30", "1:00", "1-12", "2-00:30:00"] {
            assert!(valid_time(time), "{time}");
        }
        for time in ["", "1:2:3:4", "x", "1-", "-1", "00:3a"] {
            assert!(!valid_time(time), "{time}");
        }
        let bad_mem = Resources {
            mem: Some("4GB".into()),
            ..Resources::default()
        };
        assert!(bad_mem.check().unwrap_err().contains("4GB"));
        let bad_extra = Resources {
            extra: vec!["-p gpu".into()],
            ..Resources::default()
        };
        assert!(bad_extra
            .check()
            .unwrap_err()
            .contains("starting with `--`"));
        let zero = Resources {
            cpus: Some(0),
            ..Resources::default()
        };
        assert!(zero.check().is_err());
    }
}
