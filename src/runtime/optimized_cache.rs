//! The optimized-graph cache of CPU sessions: ONNX Runtime's graph optimizations (fusions, layout changes) take
//! seconds on a large graph, so the optimized graph of each model file is written once into a cache folder and later
//! sessions load it with the optimizer off. Entries are keyed by everything the result depends on
//! ([`optimized_cache_key`]); the folder is kept within a size budget by removing the least recently used entries
//! ([`cache_budget`]); `fluxrt cache` lists and clears it ([`entries`], [`clear`]).

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Duration;

use ort::session::Session;

use super::types::Optimization;
use super::types::Provider;

/// Whether a session came from the optimized-graph cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CacheUse {
    /// No cache (turned off, a non-CPU provider, or optimization disabled).
    Off,
    /// Optimized from the model file, and the result written to the cache.
    Cold,
    /// Loaded from the cache; the optimizer did not run.
    Warm,
}

impl CacheUse {
    pub fn name(self) -> &'static str {
        match self {
            CacheUse::Off => "off",
            CacheUse::Cold => "cold",
            CacheUse::Warm => "warm",
        }
    }
}

const CACHE_MODEL_FILE: &str = "model.onnx";
pub(super) const CACHE_DATA_FILE: &str = "model.data";
/// Bumped when the cache layout or key changes.
const CACHE_FORMAT: &str = "fluxrt-optimized-v1";

/// The usual optimized-graph cache: `FLUXRT_OPTIMIZED_CACHE` (a folder, or `off`/`0`/`none` to turn the cache off),
/// else `$XDG_CACHE_HOME/fluxrt/optimized`, else `~/.cache/fluxrt/optimized`. `None` when turned off or no home
/// folder is known.
pub fn optimized_cache_dir() -> Option<PathBuf> {
    if let Some(v) = std::env::var_os("FLUXRT_OPTIMIZED_CACHE") {
        let s = v.to_string_lossy();
        if matches!(
            s.trim().to_ascii_lowercase().as_str(),
            "" | "0" | "off" | "none" | "false" | "no"
        ) {
            return None;
        }
        return Some(PathBuf::from(v));
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .filter(|v| !v.is_empty())
                .map(|h| PathBuf::from(h).join(".cache"))
        })?;
    Some(base.join("fluxrt").join("optimized"))
}

/// The cache entry name of a model: a hash of the cache format, ONNX Runtime's version, the provider, the
/// optimization level, the CPU (layout optimizations are CPU-specific), and the model file's size, mtime and a
/// content fingerprint (its first and last MiB and 64 evenly spaced 64 KiB samples), plus the size and mtime of the
/// external data files beside it. Returns `<file stem>-<16 hex digits>`.
pub fn optimized_cache_key(
    ort_version: &str,
    provider: Provider,
    optimization: Optimization,
    model: &Path,
) -> std::io::Result<String> {
    use std::hash::Hasher;
    use std::io::{Read, Seek, SeekFrom};

    let mut h = std::collections::hash_map::DefaultHasher::new();
    let put = |h: &mut std::collections::hash_map::DefaultHasher, s: &str| {
        h.write(s.as_bytes());
        h.write_u8(0xff);
    };
    put(&mut h, CACHE_FORMAT);
    put(&mut h, ort_version);
    put(&mut h, provider.name());
    put(&mut h, &format!("{optimization:?}"));
    put(&mut h, &cpu_signature());
    let meta = std::fs::metadata(model)?;
    let stamp = |m: &std::fs::Metadata| {
        let mtime = m
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos());
        format!("{}:{mtime}", m.len())
    };
    put(&mut h, &stamp(&meta));
    let len = meta.len();
    let mut f = std::fs::File::open(model)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut sample = |h: &mut std::collections::hash_map::DefaultHasher,
                      at: u64,
                      n: usize|
     -> std::io::Result<()> {
        let n = n.min(len.saturating_sub(at) as usize);
        f.seek(SeekFrom::Start(at))?;
        f.read_exact(&mut buf[..n])?;
        h.write(&buf[..n]);
        Ok(())
    };
    sample(&mut h, 0, 1 << 20)?;
    sample(&mut h, len.saturating_sub(1 << 20), 1 << 20)?;
    for i in 1..=64u64 {
        sample(&mut h, len / 65 * i, 64 << 10)?;
    }
    // External data files beside the model (`x.onnx.data`, `x.onnx_data`, `x.data`, ...).
    let stem = model.file_stem().map(|s| s.to_string_lossy().into_owned());
    if let (Some(dir), Some(stem)) = (model.parent(), stem) {
        let mut side: Vec<(String, String)> = std::fs::read_dir(if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        })?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let is_side = name.starts_with(&stem)
                && Some(name.as_str()) != model.file_name().and_then(|n| n.to_str())
                && !name.ends_with(".onnx");
            let m = e.metadata().ok()?;
            (is_side && m.is_file()).then(|| (name, stamp(&m)))
        })
        .collect();
        side.sort();
        for (n, st) in side {
            put(&mut h, &n);
            put(&mut h, &st);
        }
    }
    let stem = model
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    let stem: String = stem
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .take(40)
        .collect();
    Ok(format!("{stem}-{:016x}", h.finish()))
}

/// The CPU model and its feature flags (Linux), so a cache never serves a graph optimized for another CPU.
fn cpu_signature() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |key: &str| {
        info.lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_default()
    };
    format!(
        "{}|{}|{}",
        std::env::consts::ARCH,
        field("model name"),
        field("flags")
    )
}

/// Builds a session from a model file at an optimization level, optionally saving the optimized graph.
pub(super) type BuildFn<'a> =
    dyn Fn(&Path, Optimization, Option<&Path>) -> ort::Result<Session> + 'a;

/// Loads through the optimized-graph cache: a warm entry is loaded with the optimizer off; otherwise the model is
/// optimized, written to a private temporary folder and renamed into place (so concurrent loads never see half an
/// entry). Any cache trouble (read-only folder, a damaged entry) falls back to a plain load.
pub(super) fn load_cached(
    dir: &Path,
    ort_version: &str,
    model: &Path,
    level: Optimization,
    build: &BuildFn<'_>,
) -> ort::Result<(Session, CacheUse)> {
    let Ok(key) = optimized_cache_key(ort_version, Provider::Cpu, level, model) else {
        return Ok((build(model, level, None)?, CacheUse::Off));
    };
    let entry = dir.join(&key);
    let cached = entry.join(CACHE_MODEL_FILE);
    if cached.is_file() {
        match build(&cached, Optimization::Disable, None) {
            Ok(s) => {
                // Mark the entry as recently used, for pruning.
                if let Ok(f) = std::fs::File::options().append(true).open(&cached) {
                    let _ = f.set_modified(std::time::SystemTime::now());
                }
                return Ok((s, CacheUse::Warm));
            }
            Err(_) => {
                // A damaged entry: drop it and rebuild below.
                let _ = std::fs::remove_dir_all(&entry);
            }
        }
    }
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let tmp = dir.join(format!(
        ".{key}.tmp-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    if std::fs::create_dir_all(&tmp).is_err() {
        return Ok((build(model, level, None)?, CacheUse::Off));
    }
    let result = build(model, level, Some(&tmp.join(CACHE_MODEL_FILE)));
    let ok = result.is_ok() && tmp.join(CACHE_MODEL_FILE).is_file();
    if !(ok && std::fs::rename(&tmp, &entry).is_ok()) {
        // Another process got there first, or the write failed.
        let _ = std::fs::remove_dir_all(&tmp);
    }
    if ok {
        prune_cache(dir, &entry, cache_budget());
    }
    Ok((result?, if ok { CacheUse::Cold } else { CacheUse::Off }))
}

/// The default size budget of the cache (10 GiB): room for the optimized graphs of a few real-size models.
pub const DEFAULT_BUDGET_BYTES: u64 = 10 << 30;

/// The cache's size budget in bytes: `FLUXRT_OPTIMIZED_CACHE_MAX_MB` (mebibytes), else [`DEFAULT_BUDGET_BYTES`].
pub fn cache_budget() -> u64 {
    std::env::var("FLUXRT_OPTIMIZED_CACHE_MAX_MB")
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map_or(DEFAULT_BUDGET_BYTES, |mb| mb << 20)
}

/// One cached optimized graph.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Entry {
    /// `<model file stem>-<hash>` ([`optimized_cache_key`]).
    pub name: String,
    pub path: PathBuf,
    /// The entry's files together (graph and external data).
    pub bytes: u64,
    /// Seconds since the Unix epoch of the last load that used it (its graph file's modification time).
    pub last_used: u64,
}

/// The entries in `dir`, least recently used first; no entries for a folder that does not exist. Temporary folders
/// of writers still at work (or crashed) are not entries.
pub fn entries(dir: &Path) -> std::io::Result<Vec<Entry>> {
    let list = match std::fs::read_dir(dir) {
        Ok(l) => l,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for e in list.filter_map(|e| e.ok()) {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') || !e.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let (mut bytes, mut used) = (0u64, std::time::UNIX_EPOCH);
        for f in std::fs::read_dir(e.path()).into_iter().flatten().flatten() {
            if let Ok(m) = f.metadata() {
                bytes += m.len();
                if f.file_name() == CACHE_MODEL_FILE {
                    used = m.modified().unwrap_or(used);
                }
            }
        }
        let last_used = used
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        out.push(Entry {
            name,
            path: e.path(),
            bytes,
            last_used,
        });
    }
    out.sort_by(|a, b| (a.last_used, &a.name).cmp(&(b.last_used, &b.name)));
    Ok(out)
}

/// Removes every entry of `dir` (and leftover temporary folders); returns how many entries and bytes went.
pub fn clear(dir: &Path) -> std::io::Result<(usize, u64)> {
    let all = entries(dir)?;
    let bytes = all.iter().map(|e| e.bytes).sum();
    for e in &all {
        std::fs::remove_dir_all(&e.path)?;
    }
    remove_stale_temporaries(dir, Duration::ZERO);
    Ok((all.len(), bytes))
}

/// Removes temporary folders of crashed writers older than `age`.
fn remove_stale_temporaries(dir: &Path, age: Duration) {
    let now = std::time::SystemTime::now();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let old = e
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| now.duration_since(t).ok())
            .is_some_and(|a| a >= age);
        if name.starts_with('.') && name.contains(".tmp-") && old {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// Keeps the cache within `budget` bytes by removing the least recently used entries (never `keep`), and removes
/// temporary folders left by crashed writers (older than an hour).
fn prune_cache(dir: &Path, keep: &Path, budget: u64) {
    remove_stale_temporaries(dir, Duration::from_secs(3600));
    let Ok(all) = entries(dir) else {
        return;
    };
    let mut total: u64 = all.iter().map(|e| e.bytes).sum();
    for e in all {
        if total <= budget {
            break;
        }
        if e.path != keep && std::fs::remove_dir_all(&e.path).is_ok() {
            total -= e.bytes;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(dir: &Path, name: &str, bytes: usize, age_s: u64) -> PathBuf {
        let e = dir.join(name);
        std::fs::create_dir_all(&e).unwrap();
        let f = e.join(CACHE_MODEL_FILE);
        std::fs::write(&f, vec![0u8; bytes]).unwrap();
        let t = std::time::SystemTime::now() - Duration::from_secs(age_s);
        std::fs::File::options()
            .append(true)
            .open(&f)
            .unwrap()
            .set_modified(t)
            .unwrap();
        e
    }

    #[test]
    fn entries_list_oldest_first_and_pruning_keeps_the_budget() {
        let d = tempfile::tempdir().unwrap();
        assert!(entries(&d.path().join("missing")).unwrap().is_empty());
        let old = entry(d.path(), "a-1", 100, 300);
        let mid = entry(d.path(), "b-2", 100, 200);
        let new = entry(d.path(), "c-3", 100, 100);
        std::fs::create_dir(d.path().join(".c-3.tmp-1-0")).unwrap();
        let names: Vec<String> = entries(d.path())
            .unwrap()
            .into_iter()
            .map(|e| e.name)
            .collect();
        assert_eq!(names, ["a-1", "b-2", "c-3"]);
        // Over a 250-byte budget the least recently used goes, never the entry just written.
        prune_cache(d.path(), &old, 250);
        assert!(old.exists() && !mid.exists() && new.exists());
        let (n, bytes) = clear(d.path()).unwrap();
        assert_eq!((n, bytes), (2, 200));
        assert_eq!(
            std::fs::read_dir(d.path()).unwrap().count(),
            0,
            "temporaries go too"
        );
    }
}
