//! What provider caches are keyed by: the machine (ONNX Runtime's version, the GPUs), each graph's content
//! fingerprint, and the cache root folder.

use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// Where fluxrt keeps provider caches: `FLUXRT_CACHE_DIR`, else `$XDG_CACHE_HOME/fluxrt`, else `%LOCALAPPDATA%\fluxrt`,
/// else `~/.cache/fluxrt`, else the temporary folder's `fluxrt-cache`.
pub fn default_cache_root() -> PathBuf {
    let var = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let Some(d) = var("FLUXRT_CACHE_DIR") {
        return d;
    }
    var("XDG_CACHE_HOME")
        .or_else(|| var("LOCALAPPDATA"))
        .or_else(|| var("HOME").map(|h| h.join(".cache")))
        .map(|b| b.join("fluxrt"))
        .unwrap_or_else(|| std::env::temp_dir().join("fluxrt-cache"))
}

/// The machine facts that key the caches.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HostInfo {
    pub ort_version: String,
    /// GPU models found on the machine (NVIDIA: `/proc/driver/nvidia/gpus`), sorted; empty when unknown.
    pub gpus: Vec<String>,
}

impl HostInfo {
    /// The loaded ONNX Runtime's version and the GPUs this machine reports.
    pub fn detect(ort_version: &str) -> HostInfo {
        let mut gpus = Vec::new();
        if let Ok(dir) = std::fs::read_dir("/proc/driver/nvidia/gpus") {
            for e in dir.flatten() {
                if let Ok(info) = std::fs::read_to_string(e.path().join("information")) {
                    if let Some(m) = info.lines().find_map(|l| l.strip_prefix("Model:")) {
                        gpus.push(m.trim().to_string());
                    }
                }
            }
        }
        gpus.sort();
        HostInfo {
            ort_version: ort_version.to_string(),
            gpus,
        }
    }

    /// e.g. `gpu 0 of [NVIDIA H100 80GB HBM3]`, or `gpu 0` when the models are unknown.
    pub fn gpu_label(&self, device_id: u32) -> String {
        if self.gpus.is_empty() {
            format!("gpu {device_id}")
        } else {
            format!("gpu {device_id} of [{}]", self.gpus.join(", "))
        }
    }
}

/// One graph, as far as provider options depend on it: the caches are keyed by its content.
#[derive(Debug, Clone, PartialEq)]
pub struct GraphInfo {
    /// What the graph is called in messages and cache folder names (`transformer`, `vae_decoder`, ...).
    pub role: String,
    pub path: PathBuf,
    /// Content fingerprint (see [`graph_fingerprint`]).
    pub fingerprint: u64,
}

impl GraphInfo {
    /// Fingerprints the file (no weights are read).
    pub fn read(role: &str, path: &Path) -> Result<GraphInfo> {
        let fingerprint = graph_fingerprint(path).map_err(|e| {
            Error::model(format!("cannot read {role} graph {}: {e}", path.display()))
        })?;
        Ok(GraphInfo {
            role: role.to_string(),
            path: path.to_path_buf(),
            fingerprint,
        })
    }
}

/// FNV-1a, 64 bit: stable across Rust versions and machines, so cache folder names stay valid.
#[derive(Debug, Clone, Copy)]
pub struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv {
    pub fn bytes(&mut self, b: &[u8]) -> &mut Self {
        for &x in b {
            self.0 ^= u64::from(x);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
        self
    }
    /// A field: its bytes and a separator, so that ("ab","c") and ("a","bc") differ.
    pub fn field(&mut self, s: &str) -> &mut Self {
        self.bytes(s.as_bytes()).bytes(&[0xff])
    }
    pub fn finish(&self) -> u64 {
        self.0
    }
}

/// The model part of a cache key: the graph file's size, modification time, first and last MiB, and the size and
/// modification time of external data files beside it (`*.onnx_data`, `*.data`, or names starting with the graph's
/// stem).
pub fn graph_fingerprint(path: &Path) -> std::io::Result<u64> {
    use std::io::{Read, Seek, SeekFrom};
    const MIB: u64 = 1 << 20;
    let mut h = Fnv::default();
    let stamp = |h: &mut Fnv, m: &std::fs::Metadata| {
        h.field(&m.len().to_string());
        if let Ok(t) = m.modified() {
            if let Ok(d) = t.duration_since(std::time::UNIX_EPOCH) {
                h.field(&format!("{}.{}", d.as_secs(), d.subsec_nanos()));
            }
        }
    };
    let mut f = std::fs::File::open(path)?;
    let meta = f.metadata()?;
    stamp(&mut h, &meta);
    let mut buf = vec![0u8; MIB.min(meta.len()) as usize];
    f.read_exact(&mut buf)?;
    h.bytes(&buf);
    if meta.len() > MIB {
        f.seek(SeekFrom::End(-(MIB as i64)))?;
        f.read_exact(&mut buf)?;
        h.bytes(&buf);
    }
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let own = path
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    if let Some(dir) = path.parent() {
        let mut side: Vec<(String, std::fs::Metadata)> =
            std::fs::read_dir(if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                dir
            })?
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                let data = name.ends_with(".onnx_data")
                    || name.ends_with(".data")
                    || (name.starts_with(&format!("{stem}.")) && name != own);
                (data && !name.ends_with(".onnx")).then(|| e.metadata().ok().map(|m| (name, m)))?
            })
            .collect();
        side.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, m) in side {
            h.field(&name);
            stamp(&mut h, &m);
        }
    }
    Ok(h.finish())
}

pub(crate) fn safe_name(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}
