//! `fmnist-pipe check`: a few training steps of each model on a device, compared with the same
//! steps on the CPU's portable path (fmnist_stages::check), printed as a table or JSON. A GPU
//! build proves with it that its training matches the CPU's before a long run.

use std::path::PathBuf;

use fmnist_stages::check::{self, CheckRun, ModelCheck, PathSpec};
use fmnist_stages::data::{Dataset, Split};
use fmnist_stages::models::ModelKind;
use fmnist_stages::ops::Kernels;

use crate::error::PipeError;
use crate::output;

/// What the device is compared with, on the CPU.
#[derive(Debug, Clone, Copy)]
pub enum Reference {
    /// The portable path in f32: the same graph a GPU runs.
    Portable,
    /// The portable path in f64: near-exact arithmetic.
    F64,
}

pub struct Options {
    pub device: String,
    pub kernels: Kernels,
    pub reference: Reference,
    pub data: PathBuf,
    pub steps: usize,
    pub batch_size: usize,
    pub models: Vec<ModelKind>,
    pub json: bool,
}

pub fn run(options: &Options) -> Result<(), PipeError> {
    if options.steps == 0 || options.batch_size == 0 {
        return Err(PipeError::Config(
            "check needs --steps and --batch-size of at least 1".to_string(),
        ));
    }
    let device = fmnist_stages::device::select(&options.device)
        .map_err(|e| PipeError::StageFailed(format!("check: {e}")))?;
    let data = Dataset::load(&options.data, Split::Train).map_err(|e| {
        PipeError::Config(format!(
            "check: cannot read the training set in {} ({e}); pass --data DIR",
            options.data.display()
        ))
    })?;
    let checked = PathSpec::f32_on(device, options.kernels);
    let reference = match options.reference {
        Reference::Portable => PathSpec::cpu_portable(),
        Reference::F64 => PathSpec::cpu_f64(),
    };
    let mut results = Vec::with_capacity(options.models.len());
    for &model in &options.models {
        let run = CheckRun {
            steps: options.steps,
            batch_size: options.batch_size,
            ..CheckRun::new(model)
        };
        let result = check::compare(&run, &checked, &reference, &data)
            .map_err(|e| PipeError::StageFailed(format!("check of {model}: {e:#}")))?;
        if !options.json {
            output::emit(&as_text(&result))?;
        }
        results.push(result);
    }
    if options.json {
        let passed = results.iter().all(|r| r.passed);
        let out = serde_json::json!({ "passed": passed, "models": results });
        output::emit_line(&serde_json::to_string_pretty(&out).unwrap_or_default())?;
    }
    let failed: Vec<String> = results
        .iter()
        .filter(|r| !r.passed)
        .map(|r| format!("{}: {}", r.model, r.failures.join("; ")))
        .collect();
    if failed.is_empty() {
        Ok(())
    } else {
        Err(PipeError::StageFailed(format!(
            "check failed: {}",
            failed.join(" | ")
        )))
    }
}

fn as_text(r: &ModelCheck) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{}: {} against {}, {} steps of {} images",
        r.model,
        r.paths[0],
        r.paths[1],
        r.steps.len(),
        r.batch_size
    );
    let _ = writeln!(
        out,
        "  step  loss (checked)  loss (reference)  loss diff  grad diff  worst parameter's"
    );
    for s in &r.steps {
        let _ = writeln!(
            out,
            "  {:>4}  {:>14.6}  {:>16.6}  {:>9.2e}  {:>9.2e}  {:.2e} {}",
            s.step,
            s.loss[0],
            s.loss[1],
            s.loss_rel_diff,
            s.grad_rel_l2,
            s.worst_param_grad_rel_l2,
            s.worst_param
        );
    }
    let t = &r.tolerance;
    let _ = writeln!(
        out,
        "  eval logits before {:.2e} (tolerance {:.0e}), after {:.2e} ({:.0e}); parameters after {:.2e} ({:.0e})",
        r.initial_logits_rel_diff,
        t.initial_logits_rel,
        r.final_logits_rel_diff,
        t.final_logits_rel,
        r.param_rel_l2,
        t.param_rel_l2
    );
    let _ = writeln!(
        out,
        "  tolerance per step: loss {:.0e}; first step's gradients {:.0e} together, {:.0e} each",
        t.loss_rel, t.first_grad_rel_l2, t.first_param_grad_rel_l2
    );
    let _ = writeln!(
        out,
        "  {:.2}s against {:.2}s: {}",
        r.seconds[0],
        r.seconds[1],
        if r.passed { "ok" } else { "FAILED" }
    );
    out
}
