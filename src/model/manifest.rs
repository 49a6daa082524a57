//! `manifest.json`, schema version 1, as the export step writes it (export/manifest.py documents the fields).

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::schedule::SchedulerConfig;
use crate::{Error, Result};

pub const FILE_NAME: &str = "manifest.json";
pub const SCHEMA_VERSION: u32 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Variant {
    Schnell,
    Dev,
}

impl Variant {
    pub fn name(self) -> &'static str {
        match self {
            Variant::Schnell => "schnell",
            Variant::Dev => "dev",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VaeConfig {
    pub scaling_factor: f32,
    pub shift_factor: f32,
    pub downsample_factor: usize,
}

impl Default for VaeConfig {
    /// The FLUX.1 VAE.
    fn default() -> Self {
        VaeConfig {
            scaling_factor: 0.3611,
            shift_factor: 0.1159,
            downsample_factor: 8,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Defaults {
    pub steps: usize,
    pub guidance: Option<f32>,
    pub t5_max_length: usize,
    pub width: u32,
    pub height: u32,
}

impl Defaults {
    /// BFL's sampling defaults for each variant (used when a model comes without a manifest).
    pub fn for_variant(v: Variant) -> Self {
        match v {
            Variant::Schnell => Defaults {
                steps: 4,
                guidance: None,
                t5_max_length: 256,
                width: 1024,
                height: 1024,
            },
            Variant::Dev => Defaults {
                steps: 28,
                guidance: Some(3.5),
                t5_max_length: 512,
                width: 1024,
                height: 1024,
            },
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenizerEntry {
    pub file: String,
    pub kind: String,
    pub max_length: usize,
    pub pad_id: u32,
    #[serde(default)]
    pub bos_id: Option<u32>,
    #[serde(default)]
    pub eos_id: Option<u32>,
    #[serde(default)]
    pub vocab_size: Option<usize>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Tokenizers {
    pub clip: TokenizerEntry,
    pub t5: TokenizerEntry,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IoEntry {
    pub name: String,
    pub dtype: String,
    pub shape: Vec<serde_json::Value>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GraphEntry {
    pub file: String,
    pub precision: String,
    #[serde(default)]
    pub opset: Option<u32>,
    #[serde(default)]
    pub external_data: Option<String>,
    #[serde(default)]
    pub islands: serde_json::Value,
    #[serde(default)]
    pub inputs: Vec<IoEntry>,
    #[serde(default)]
    pub outputs: Vec<IoEntry>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub schema_version: u32,
    pub name: String,
    pub variant: Variant,
    pub guidance_embeds: bool,
    pub latent_channels: usize,
    pub vae: VaeConfig,
    pub defaults: Defaults,
    pub scheduler: SchedulerConfig,
    pub tokenizers: Tokenizers,
    pub graphs: BTreeMap<String, GraphEntry>,
    #[serde(default)]
    pub source: serde_json::Value,
    #[serde(default)]
    pub exporter: serde_json::Value,
}

impl Manifest {
    pub fn read(path: &Path) -> Result<Manifest> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io_at("read", path, e))?;
        Self::parse(&text).map_err(|e| {
            Error::model(format!(
                "{} is not a valid fluxrt manifest: {}",
                path.display(),
                e.message
            ))
            .with_hint(
                e.hint
                    .unwrap_or_else(|| "re-run the export step (python -m export)".into()),
            )
        })
    }

    pub fn parse(text: &str) -> Result<Manifest> {
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| Error::model(format!("invalid JSON ({e})")))?;
        let version = value.get("schema_version").and_then(|v| v.as_u64());
        if version != Some(SCHEMA_VERSION as u64) {
            return Err(Error::model(format!(
                "schema_version is {}, this fluxrt reads version {SCHEMA_VERSION}",
                version.map_or("missing".to_string(), |v| v.to_string())
            ))
            .with_hint(
                "re-export the model with this fluxrt's export step, or use a matching fluxrt",
            ));
        }
        serde_json::from_value(value).map_err(|e| Error::model(format!("{e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bundled(name: &str) -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("models")
            .join(name)
            .join(FILE_NAME)
    }

    #[test]
    fn reads_both_bundled_manifests() {
        let s = Manifest::read(&bundled("tiny-flux-schnell")).unwrap();
        assert_eq!(s.variant, Variant::Schnell);
        assert!(!s.guidance_embeds);
        assert_eq!(s.defaults.t5_max_length, 256);
        assert!(!s.scheduler.use_dynamic_shifting);
        assert_eq!(s.graphs.len(), 5);
        let d = Manifest::read(&bundled("tiny-flux-dev")).unwrap();
        assert_eq!(d.variant, Variant::Dev);
        assert_eq!(d.defaults.guidance, Some(3.5));
        assert!(d.scheduler.use_dynamic_shifting);
        assert!(d.graphs["transformer"]
            .inputs
            .iter()
            .any(|i| i.name == "guidance"));
    }

    #[test]
    fn wrong_schema_version_is_refused_with_a_hint() {
        let err = Manifest::parse(r#"{"schema_version": 7}"#).unwrap_err();
        assert!(err.message.contains("schema_version is 7"), "{err}");
        assert!(err.hint.is_some());
        let err = Manifest::parse("{not json").unwrap_err();
        assert!(err.message.contains("invalid JSON"), "{err}");
    }
}
