//! Which execution provider ONNX Runtime really placed each graph's nodes on, read from its own report.
//!
//! ONNX Runtime has no API for node placement; it reports it when a session is created
//! (`VerifyEachNodeIsAssignedToAnEp`: " All nodes placed on \[CUDAExecutionProvider\]. Number of nodes: 812", or one
//! " Node(s) placed on \[X\]. Number of nodes: N" line per provider), but only to a session logger at VERBOSE. So
//! each session is built with its own log id at VERBOSE ([`capture`]), the environment's logger ([`log_sink`])
//! keeps those lines for ids being captured and drops the rest of the verbose chatter, and runs are logged at
//! WARNING through their run options ([`quiet`]) so that the verbose session costs nothing per run.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use ort::logging::LogLevel;
use ort::session::RunOptions;

/// Nodes per execution provider (ONNX Runtime's names, e.g. `CUDAExecutionProvider`), in report order.
pub type NodeCounts = Vec<(String, usize)>;

static CAPTURES: Mutex<Option<HashMap<String, NodeCounts>>> = Mutex::new(None);
static NEXT_ID: AtomicU64 = AtomicU64::new(0);

/// Starts capturing the placement report of one session; build it with the returned log id at VERBOSE, then
/// call [`finish`] with the id.
pub fn capture() -> String {
    let id = format!("fluxrt-{}", NEXT_ID.fetch_add(1, Ordering::Relaxed));
    lock()
        .get_or_insert_with(HashMap::new)
        .insert(id.clone(), Vec::new());
    id
}

/// The placement captured for `id` (empty when ONNX Runtime reported none), and stops capturing it.
pub fn finish(id: &str) -> NodeCounts {
    lock()
        .as_mut()
        .and_then(|m| m.remove(id))
        .unwrap_or_default()
}

/// The environment's logger: keeps the placement lines of captured sessions. Everything else is dropped, as it
/// was before fluxrt had a logger (ONNX Runtime's warnings are mostly about graph rewrites a user cannot act on).
pub fn log_sink(level: LogLevel, _category: &str, id: &str, _location: &str, message: &str) {
    if level != LogLevel::Verbose {
        return;
    }
    let Some(counts) = parse(message) else {
        return;
    };
    if let Some(placed) = lock().as_mut().and_then(|m| m.get_mut(id)) {
        placed.push(counts);
    }
}

/// Run options that keep a verbose session's runs at WARNING (a run logs at its session's level otherwise).
pub fn quiet(opts: &mut RunOptions) -> ort::Result<()> {
    opts.set_log_level(LogLevel::Warning)
}

fn lock() -> std::sync::MutexGuard<'static, Option<HashMap<String, NodeCounts>>> {
    CAPTURES.lock().unwrap_or_else(|e| e.into_inner())
}

/// `(provider, nodes)` from one placement line.
fn parse(message: &str) -> Option<(String, usize)> {
    let rest = message
        .split_once("placed on [")
        .filter(|(head, _)| head.ends_with("All nodes ") || head.ends_with("Node(s) "))?
        .1;
    let (provider, rest) = rest.split_once(']')?;
    let count = rest.rsplit_once(':')?.1.trim().parse().ok()?;
    Some((provider.to_string(), count))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_both_report_forms() {
        assert_eq!(
            parse(" All nodes placed on [CUDAExecutionProvider]. Number of nodes: 812"),
            Some(("CUDAExecutionProvider".into(), 812))
        );
        assert_eq!(
            parse(" Node(s) placed on [CPUExecutionProvider]. Number of nodes: 3"),
            Some(("CPUExecutionProvider".into(), 3))
        );
        assert_eq!(parse("   MemcpyFromHost (Memcpy)"), None);
        assert_eq!(
            parse("Some nodes were not assigned to the preferred execution providers"),
            None
        );
        assert_eq!(
            parse(" Node(s) placed on [CPUExecutionProvider]. Number of nodes: many"),
            None
        );
    }

    #[test]
    fn keeps_lines_of_captured_sessions_only() {
        let id = capture();
        let line = " Node(s) placed on [CPUExecutionProvider]. Number of nodes: 2";
        log_sink(LogLevel::Verbose, "", &id, "", line);
        log_sink(LogLevel::Warning, "", &id, "", line);
        log_sink(LogLevel::Verbose, "", "someone-else", "", line);
        log_sink(
            LogLevel::Verbose,
            "",
            &id,
            "",
            " Node(s) placed on [CUDAExecutionProvider]. Number of nodes: 40",
        );
        assert_eq!(
            finish(&id),
            vec![
                ("CPUExecutionProvider".to_string(), 2),
                ("CUDAExecutionProvider".to_string(), 40)
            ]
        );
        assert!(finish(&id).is_empty(), "finished ids are forgotten");
    }
}
