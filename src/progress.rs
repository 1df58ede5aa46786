//! What the user sees while a run goes: one line per stage event, and for long stages a live
//! bar (indicatif) on a terminal or throttled plain lines otherwise. Implements the stages'
//! `Progress` trait.

use std::io::{IsTerminal, Write};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use fmnist_stages::Progress;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// The run's output channel; lines go above any live bars. On a terminal the run's overall
/// progress (stages done / total, like cargo's) stays at the bottom while it runs.
pub struct Console {
    multi: Option<MultiProgress>,
    overall: Mutex<Option<ProgressBar>>,
}

impl Console {
    pub fn new() -> Self {
        let multi = std::io::stdout()
            .is_terminal()
            .then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stdout()));
        Console {
            multi,
            overall: Mutex::new(None),
        }
    }

    /// A run of `stages` stages begins.
    pub fn start_run(&self, stages: usize) {
        let Some(multi) = &self.multi else { return };
        let bar = ProgressBar::new(stages as u64);
        if let Ok(style) =
            ProgressStyle::with_template("{prefix:>8} [{bar:30}] {pos}/{len} stages {elapsed}")
        {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.set_prefix("Running");
        bar.enable_steady_tick(Duration::from_millis(200));
        if let Ok(mut overall) = self.overall.lock() {
            *overall = Some(multi.add(bar));
        }
    }

    /// One more stage finished (whatever its outcome).
    pub fn stage_done(&self) {
        if let Ok(overall) = self.overall.lock() {
            if let Some(bar) = overall.as_ref() {
                bar.inc(1);
            }
        }
    }

    /// The run is over: the overall bar goes.
    pub fn end_run(&self) {
        if let Ok(mut overall) = self.overall.lock() {
            if let Some(bar) = overall.take() {
                bar.finish_and_clear();
            }
        }
    }

    pub fn line(&self, text: &str) {
        match &self.multi {
            Some(m) => {
                let _ = m.println(text);
            }
            None => {
                let mut out = std::io::stdout().lock();
                let _ = writeln!(out, "{text}");
                let _ = out.flush();
            }
        }
    }

    pub fn stage(&self, name: &str) -> StageProgress<'_> {
        StageProgress {
            console: self,
            name: name.to_string(),
            state: Mutex::new(PhaseState::default()),
        }
    }
}

impl Default for Console {
    fn default() -> Self {
        Self::new()
    }
}

#[derive(Default)]
struct PhaseState {
    bar: Option<ProgressBar>,
    phase: String,
    unit: String,
    total: u64,
    done: u64,
    message: String,
    last_line: Option<Instant>,
}

/// One stage's progress sink.
pub struct StageProgress<'a> {
    console: &'a Console,
    name: String,
    state: Mutex<PhaseState>,
}

/// How often a non-terminal run prints progress of a long phase.
const PLAIN_INTERVAL: Duration = Duration::from_secs(10);

impl StageProgress<'_> {
    fn with_state(&self, f: impl FnOnce(&mut PhaseState)) {
        if let Ok(mut state) = self.state.lock() {
            f(&mut state);
        }
    }
}

impl Progress for StageProgress<'_> {
    fn start(&self, phase: &str, total: u64, unit: &str) {
        self.with_state(|s| {
            if let Some(old) = s.bar.take() {
                old.finish_and_clear();
            }
            *s = PhaseState {
                phase: phase.to_string(),
                unit: unit.to_string(),
                total,
                last_line: Some(Instant::now()),
                ..PhaseState::default()
            };
            if let Some(multi) = &self.console.multi {
                let bar = if total > 0 {
                    ProgressBar::new(total)
                } else {
                    ProgressBar::new_spinner()
                };
                let template = if total > 0 {
                    "[{prefix}] {wide_msg} {bar:30} {pos}/{len} {unit} ({eta})"
                } else {
                    "[{prefix}] {spinner} {wide_msg} {pos} {unit}"
                }
                .replace("{unit}", unit);
                if let Ok(style) = ProgressStyle::with_template(&template) {
                    bar.set_style(style);
                }
                bar.set_prefix(self.name.clone());
                bar.set_message(phase.to_string());
                bar.enable_steady_tick(Duration::from_millis(200));
                s.bar = Some(multi.add(bar));
            }
        });
    }

    fn advance(&self, done: u64) {
        let mut line = None;
        self.with_state(|s| {
            s.done += done;
            if let Some(bar) = &s.bar {
                bar.inc(done);
            } else if s.last_line.is_none_or(|t| t.elapsed() >= PLAIN_INTERVAL) {
                s.last_line = Some(Instant::now());
                let of = if s.total > 0 {
                    format!("/{}", s.total)
                } else {
                    String::new()
                };
                let msg = if s.message.is_empty() {
                    String::new()
                } else {
                    format!(" {}", s.message)
                };
                line = Some(format!(
                    "[{}] {} {}{of} {}{msg}",
                    self.name, s.phase, s.done, s.unit
                ));
            }
        });
        if let Some(line) = line {
            self.console.line(&line);
        }
    }

    fn message(&self, msg: &str) {
        self.with_state(|s| {
            s.message = msg.to_string();
            if let Some(bar) = &s.bar {
                bar.set_message(format!("{} {msg}", s.phase));
            }
        });
    }

    fn finish(&self, summary: &str) {
        self.with_state(|s| {
            if let Some(bar) = s.bar.take() {
                bar.finish_and_clear();
            }
        });
        self.console.line(&format!("[{}] {summary}", self.name));
    }

    fn println(&self, line: &str) {
        self.console.line(&format!("[{}] {line}", self.name));
    }
}

/// A stage that ends without finishing its last phase (a cached download, an error) must
/// not leave its bar on screen.
impl Drop for StageProgress<'_> {
    fn drop(&mut self) {
        self.with_state(|s| {
            if let Some(bar) = s.bar.take() {
                bar.finish_and_clear();
            }
        });
    }
}

/// "0.42s", "3m05s" for finish lines.
pub fn duration(d: Duration) -> String {
    let secs = d.as_secs_f64();
    if secs < 60.0 {
        format!("{secs:.2}s")
    } else {
        let whole = d.as_secs();
        format!("{}m{:02}s", whole / 60, whole % 60)
    }
}
