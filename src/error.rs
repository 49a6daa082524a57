//! One error type for the whole crate. Every error names the problem and, where there is one, the fix,
//! because the users are people at a terminal or an HTTP client, not a debugger.

use std::fmt;

/// What went wrong, coarsely: decides the CLI exit code and the HTTP status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The user's request is invalid (size, steps, prompt, flags).
    InvalidInput,
    /// The model folder, a graph or a tokenizer is missing, corrupt or does not fit the contract.
    Model,
    /// ONNX Runtime itself: library missing or too old, session or run failure.
    Runtime,
    /// An execution provider was asked for and cannot be used.
    Provider,
    /// NaN or Inf appeared in a tensor.
    Numerics,
    /// Reading or writing a user file.
    Io,
    /// The run was cancelled.
    Cancelled,
}

#[derive(Debug)]
pub struct Error {
    pub kind: ErrorKind,
    pub message: String,
    pub hint: Option<String>,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            kind,
            message: message.into(),
            hint: None,
        }
    }
    /// Adds the sentence that tells the user how to fix the problem.
    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }
    pub fn input(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidInput, message)
    }
    pub fn model(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Model, message)
    }
    pub fn runtime(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Runtime, message)
    }
    pub fn provider(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Provider, message)
    }
    pub fn numerics(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Numerics, message)
    }
    pub fn io(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Io, message)
    }
    /// An I/O error on `path`, with what we were doing.
    pub fn io_at(action: &str, path: &std::path::Path, err: std::io::Error) -> Self {
        Self::io(format!("cannot {action} {}: {err}", path.display()))
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)?;
        if let Some(hint) = &self.hint {
            write!(f, "\n  hint: {hint}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Error {}

/// Stops the run when a stage produced NaN or Inf, naming the stage.
pub fn ensure_finite(stage: &str, data: &[f32]) -> Result<()> {
    let bad = data.iter().filter(|v| !v.is_finite()).count();
    if bad == 0 {
        return Ok(());
    }
    Err(non_finite(stage, bad, data.len()))
}

/// The error of [`ensure_finite`], from a count (the device loop counts on the device).
pub fn non_finite(stage: &str, bad: usize, len: usize) -> Error {
    Error::numerics(format!("{stage} contains {bad} NaN/Inf values of {len}")).with_hint(
        "fp16 overflow is the usual cause: use a graph exported with fp32 islands (python -m export --precision fp16 \
         keeps them), an fp32 or bf16 export, or another execution provider",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ensure_finite_names_the_stage() {
        assert!(ensure_finite("x", &[0.0, 1.0]).is_ok());
        let e = ensure_finite("latents after step 2", &[0.0, f32::NAN, f32::INFINITY]).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Numerics);
        assert!(
            e.message
                .contains("latents after step 2 contains 2 NaN/Inf"),
            "{e}"
        );
        assert!(e.hint.unwrap().contains("fp32 islands"));
    }
}
