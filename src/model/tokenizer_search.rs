//! Where a model's tokenizers are when its folder has none, as BFL's ONNX downloads do: `--tokenizers DIR` (a base
//! repository folder or cache snapshot, or a repo id), the model folder's own `tokenizer/` and `tokenizer_2/`, then
//! the Hugging Face cache: the base repository of a cached `*-onnx` download, FLUX.1-schnell and FLUX.1-dev (every
//! FLUX.1 model shares their CLIP-L and T5-XXL tokenizers), and the encoders' own repositories. The first usable
//! folder wins for each tokenizer; when none is found, the error lists every place looked at.

use std::path::{Path, PathBuf};

use super::hub;
use crate::text::{TokenizerSource, TokenizerStyle};
use crate::{Error, Result};

/// The base repositories whose `tokenizer/` and `tokenizer_2/` every FLUX.1 model can use.
pub const BASE_REPOS: [&str; 2] = [
    "black-forest-labs/FLUX.1-schnell",
    "black-forest-labs/FLUX.1-dev",
];
/// The text encoders' own repositories (tokenizer files at their root).
const CLIP_REPO: &str = "openai/clip-vit-large-patch14";
const T5_REPO: &str = "google/t5-v1_1-xxl";

/// The command that puts FLUX.1's tokenizers where fluxrt finds them.
pub const DOWNLOAD_COMMAND: &str =
    "hf download black-forest-labs/FLUX.1-schnell --include 'tokenizer/*' 'tokenizer_2/*'";

/// One place to look: the folder, and what it is (for the error).
#[derive(Debug, Clone)]
struct Place {
    dir: PathBuf,
    what: String,
}

/// The CLIP and T5 tokenizer folders for the model at `root`. `explicit` (`--tokenizers`) is the only place looked
/// at when given: a folder with `tokenizer/` and `tokenizer_2/`, or a repo id in the Hugging Face cache.
pub fn find(root: &Path, explicit: Option<&Path>) -> Result<(PathBuf, PathBuf)> {
    let cache = hub::cache_root();
    let (clip_places, t5_places) = match explicit {
        Some(dir) => {
            let base = explicit_base(dir, cache.as_deref())?;
            (
                vec![place(base.join("tokenizer"), "--tokenizers")],
                vec![place(base.join("tokenizer_2"), "--tokenizers")],
            )
        }
        None => places(root, cache.as_deref()),
    };
    Ok((
        first_usable(&clip_places, TokenizerStyle::Clip, root, explicit.is_some())?,
        first_usable(&t5_places, TokenizerStyle::T5, root, explicit.is_some())?,
    ))
}

fn place(dir: PathBuf, what: impl Into<String>) -> Place {
    Place {
        dir,
        what: what.into(),
    }
}

/// `--tokenizers` as given: an existing folder, or a repo id resolved in the cache.
fn explicit_base(dir: &Path, cache: Option<&Path>) -> Result<PathBuf> {
    if dir.is_dir() {
        return Ok(dir.to_path_buf());
    }
    let text = dir.to_string_lossy();
    if hub::is_repo_id(&text) {
        if let Some(snap) = cache.and_then(|c| hub::snapshot(c, &text)) {
            return Ok(snap);
        }
        return Err(Error::input(format!(
            "--tokenizers {text}: no such folder, and the Hugging Face cache ({}) has no snapshot of that repository",
            cache.map_or("not found".to_string(), |c| c.display().to_string())
        ))
        .with_hint(format!("download it first: `hf download {text} --include 'tokenizer/*' 'tokenizer_2/*'`")));
    }
    Err(Error::input(format!("--tokenizers {}: no such folder", dir.display()))
        .with_hint("pass a folder holding tokenizer/ and tokenizer_2/ (a FLUX.1 base repository or its cache snapshot)"))
}

/// Every place to look for each tokenizer, in order, without `--tokenizers`.
fn places(root: &Path, cache: Option<&Path>) -> (Vec<Place>, Vec<Place>) {
    let mut clip = vec![place(root.join("tokenizer"), "the model folder")];
    let mut t5 = vec![place(root.join("tokenizer_2"), "the model folder")];
    let Some(cache) = cache else {
        return (clip, t5);
    };
    let mut repos: Vec<String> = Vec::new();
    // A cached `org/NAME-onnx` download: its base repository `org/NAME` first.
    let snapshot_repo = hub::repo_of_snapshot(root).or_else(|| {
        root.canonicalize()
            .ok()
            .and_then(|p| hub::repo_of_snapshot(&p))
    });
    if let Some(base) = snapshot_repo
        .as_deref()
        .and_then(|r| r.strip_suffix("-onnx"))
    {
        repos.push(base.to_string());
    }
    for base in BASE_REPOS {
        if !repos.iter().any(|r| r == base) {
            repos.push(base.to_string());
        }
    }
    let snap_or_repo = |repo: &str| {
        hub::snapshot(cache, repo).unwrap_or_else(|| hub::repo_dir(cache, repo).join("snapshots"))
    };
    for repo in &repos {
        let snap = snap_or_repo(repo);
        clip.push(place(
            snap.join("tokenizer"),
            format!("the Hugging Face cache, {repo}"),
        ));
        t5.push(place(
            snap.join("tokenizer_2"),
            format!("the Hugging Face cache, {repo}"),
        ));
    }
    clip.push(place(
        snap_or_repo(CLIP_REPO),
        format!("the Hugging Face cache, {CLIP_REPO}"),
    ));
    t5.push(place(
        snap_or_repo(T5_REPO),
        format!("the Hugging Face cache, {T5_REPO}"),
    ));
    (clip, t5)
}

/// The first place holding a usable tokenizer of `style`, or an error listing each place and why it was not.
fn first_usable(
    places: &[Place],
    style: TokenizerStyle,
    root: &Path,
    explicit: bool,
) -> Result<PathBuf> {
    let mut tried = Vec::new();
    for p in places {
        match TokenizerSource::locate(&p.dir, style) {
            Ok(_) => return Ok(p.dir.clone()),
            Err(e) => {
                let why = if p.dir.exists() {
                    e.message
                } else {
                    "not there".to_string()
                };
                tried.push(format!("{} ({}): {why}", p.dir.display(), p.what));
            }
        }
    }
    let hint = if explicit {
        "pass a folder holding tokenizer/ (CLIP) and tokenizer_2/ (T5), e.g. a FLUX.1-schnell download or its cache \
         snapshot"
            .to_string()
    } else {
        format!(
            "BFL's ONNX downloads ship no tokenizers: fetch the base repository's into the Hugging Face cache, where \
             fluxrt finds them: `{DOWNLOAD_COMMAND}`; or pass --tokenizers DIR (a folder with tokenizer/ and \
             tokenizer_2/)"
        )
    };
    Err(Error::model(format!(
        "no {} tokenizer found for {}; looked in:\n  {}",
        style.name(),
        root.display(),
        tried.join("\n  ")
    ))
    .with_hint(hint))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn places_start_at_the_model_and_end_at_the_encoders_repos() {
        let cache = Path::new("/hub");
        let root = Path::new("/hub/models--black-forest-labs--FLUX.1-Kontext-dev-onnx/snapshots/c");
        let (clip, t5) = places(root, Some(cache));
        assert_eq!(clip[0].dir, root.join("tokenizer"));
        assert_eq!(t5[0].dir, root.join("tokenizer_2"));
        assert!(
            clip[1]
                .what
                .ends_with("black-forest-labs/FLUX.1-Kontext-dev"),
            "{:?}",
            clip[1]
        );
        assert!(clip[2].what.ends_with("FLUX.1-schnell"));
        assert!(clip[3].what.ends_with("FLUX.1-dev"));
        assert!(clip.last().unwrap().what.ends_with(CLIP_REPO));
        assert!(t5.last().unwrap().what.ends_with(T5_REPO));
        assert_eq!(clip.len(), 5);
        // Without a cache: the model folder only.
        assert_eq!(places(root, None).0.len(), 1);
    }
}
