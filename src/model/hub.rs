//! The Hugging Face hub cache, where users' downloads already are: `$HF_HUB_CACHE` (default `$HF_HOME/hub`, default
//! `~/.cache/huggingface/hub`) holds `models--{org}--{name}/snapshots/{commit}/...` (files are symlinks into
//! `../../blobs/`) and `refs/main`, the commit of the default branch. Read-only: fluxrt never writes there.

use std::path::{Component, Path, PathBuf};

/// The hub cache folder, as huggingface_hub picks it.
pub fn cache_root() -> Option<PathBuf> {
    let var = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    var("HF_HUB_CACHE")
        .or_else(|| var("HF_HOME").map(|h| h.join("hub")))
        .or_else(|| var("XDG_CACHE_HOME").map(|c| c.join("huggingface").join("hub")))
        .or_else(|| var("HOME").map(|h| h.join(".cache").join("huggingface").join("hub")))
}

/// Whether `s` looks like a repo id (`org/name`), not a path.
pub fn is_repo_id(s: &str) -> bool {
    let mut parts = s.split('/');
    let ok = |p: Option<&str>| {
        p.is_some_and(|p| {
            !p.is_empty()
                && p != "."
                && p != ".."
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        })
    };
    ok(parts.next()) && ok(parts.next()) && parts.next().is_none()
}

/// `models--{org}--{name}` under `cache`.
pub fn repo_dir(cache: &Path, repo_id: &str) -> PathBuf {
    cache.join(format!("models--{}", repo_id.replace('/', "--")))
}

/// The snapshot of `repo_id`'s default branch in `cache`: the commit `refs/main` names, else the only snapshot.
pub fn snapshot(cache: &Path, repo_id: &str) -> Option<PathBuf> {
    let repo = repo_dir(cache, repo_id);
    if let Ok(commit) = std::fs::read_to_string(repo.join("refs").join("main")) {
        let dir = repo.join("snapshots").join(commit.trim());
        if dir.is_dir() {
            return Some(dir);
        }
    }
    let mut snaps: Vec<PathBuf> = std::fs::read_dir(repo.join("snapshots"))
        .ok()?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    (snaps.len() == 1).then(|| snaps.remove(0))
}

/// The repo id of a path inside a cache snapshot (`.../models--org--name/snapshots/<commit>[/...]`).
pub fn repo_of_snapshot(path: &Path) -> Option<String> {
    let parts: Vec<String> = path
        .components()
        .filter_map(|c| match c {
            Component::Normal(s) => Some(s.to_string_lossy().into_owned()),
            _ => None,
        })
        .collect();
    let at = parts.iter().rposition(|p| p == "snapshots")?;
    let repo = parts.get(at.checked_sub(1)?)?.strip_prefix("models--")?;
    let (org, name) = repo.split_once("--")?;
    Some(format!("{org}/{name}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_ids_and_snapshots() {
        assert!(is_repo_id("black-forest-labs/FLUX.1-schnell-onnx"));
        for not in ["./x", "a/b/c", "/abs", "flux", "a/..", "a b/c", "a/"] {
            assert!(!is_repo_id(not), "{not}");
        }
        assert_eq!(
            repo_of_snapshot(Path::new(
                "/h/hub/models--black-forest-labs--FLUX.1-dev-onnx/snapshots/abc/transformer.opt"
            ))
            .as_deref(),
            Some("black-forest-labs/FLUX.1-dev-onnx")
        );
        assert_eq!(repo_of_snapshot(Path::new("/work/models/flux")), None);

        let d = tempfile::tempdir().unwrap();
        let repo = repo_dir(d.path(), "org/name");
        assert!(repo.ends_with("models--org--name"));
        assert_eq!(snapshot(d.path(), "org/name"), None);
        std::fs::create_dir_all(repo.join("snapshots/c1")).unwrap();
        assert_eq!(
            snapshot(d.path(), "org/name"),
            Some(repo.join("snapshots/c1"))
        );
        std::fs::create_dir_all(repo.join("snapshots/c2")).unwrap();
        assert_eq!(
            snapshot(d.path(), "org/name"),
            None,
            "two snapshots and no ref: ambiguous"
        );
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs/main"), "c2").unwrap();
        assert_eq!(
            snapshot(d.path(), "org/name"),
            Some(repo.join("snapshots/c2"))
        );
    }
}
