//! `fluxrt cache`: where the optimized-graph cache is, what it holds and how much of its budget that uses; `clear`
//! empties it.

use std::path::PathBuf;

use clap::{Args as ClapArgs, ValueEnum};
use fluxrt::runtime::optimized_cache::{self, cache_budget};
use fluxrt::{Error, Result};
use serde_json::json;

use super::common::{print_json, print_out};

#[derive(ClapArgs, Debug)]
pub struct Args {
    /// What to do: show the cache (default), or clear it.
    #[arg(value_enum, default_value = "show")]
    action: Action,
    /// The cache folder (default: FLUXRT_OPTIMIZED_CACHE, else ~/.cache/fluxrt/optimized).
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
    /// Print the same as JSON on stdout.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Action {
    Show,
    Clear,
}

pub fn run(a: Args) -> Result<()> {
    let Some(dir) = a.dir.or_else(fluxrt::runtime::optimized_cache_dir) else {
        let text =
            "the optimized-graph cache is off (FLUXRT_OPTIMIZED_CACHE=off) or has no home folder\n";
        return print_out(text);
    };
    let io = |e: std::io::Error| Error::io(format!("cannot read the cache {}: {e}", dir.display()));
    if let Action::Clear = a.action {
        let (n, bytes) = optimized_cache::clear(&dir).map_err(io)?;
        return print_out(&format!(
            "removed {n} entries ({}) from {}\n",
            human(bytes),
            dir.display()
        ));
    }
    let entries = optimized_cache::entries(&dir).map_err(io)?;
    let total: u64 = entries.iter().map(|e| e.bytes).sum();
    let budget = cache_budget();
    if a.json {
        return print_json(&json!({
            "dir": dir,
            "entries": entries,
            "bytes": total,
            "budget_bytes": budget,
        }));
    }
    let mut text = format!(
        "optimized-graph cache {}\n{} entries, {} of a {} budget (FLUXRT_OPTIMIZED_CACHE_MAX_MB); least recently \
         used first:\n",
        dir.display(),
        entries.len(),
        human(total),
        human(budget)
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    for e in &entries {
        let age = now.saturating_sub(e.last_used);
        text += &format!(
            "  {:>10}  used {:>6} ago  {}\n",
            human(e.bytes),
            ago(age),
            e.name
        );
    }
    text += "`fluxrt cache clear` empties it; --no-optimized-cache on generate, serve and bench bypasses it\n";
    print_out(&text)
}

fn human(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn ago(secs: u64) -> String {
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}
