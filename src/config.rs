//! The `[providers]` section of a config file (`--config`) and the matching command-line flags, flags overriding the
//! file: the execution provider settings (runtime's [`EpSettings`]), the provider order, the declared image size and
//! batch range (FLUX shapes, [`crate::model::shapes`]) and the BFL transformer precision. docs/providers.md lists every
//! key.

use std::path::Path;

use serde::Deserialize;

use crate::model::shapes::{BatchRange, ShapeRange, SizeRange};
use crate::model::BFL_TRANSFORMER_PRECISIONS;
use crate::runtime::ep::values::de_parsed;
use crate::runtime::ep::{CoreMlLayer, CudaLayer, DirectMlLayer, EpSettings, TensorRtLayer};
use crate::runtime::Provider;
use crate::{Error, Result};

/// The `[providers]` section of a config file, or the equivalent command-line flags. Unset = not given.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProvidersLayer {
    /// Providers in priority order, as `--provider` takes them (`tensorrt,cuda,cpu`).
    pub order: Option<String>,
    pub device_id: Option<u32>,
    #[serde(default, deserialize_with = "de_parsed")]
    pub sizes: Option<SizeRange>,
    #[serde(default, deserialize_with = "de_parsed")]
    pub batch: Option<BatchRange>,
    pub transformer_precision: Option<String>,
    #[serde(default)]
    pub tensorrt: TensorRtLayer,
    #[serde(default)]
    pub cuda: CudaLayer,
    #[serde(default)]
    pub directml: DirectMlLayer,
    #[serde(default)]
    pub coreml: CoreMlLayer,
}

/// The settings after defaults, config file and flags.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ProviderConfig {
    /// Provider order from the config file (`--provider` wins).
    pub order: Option<Vec<Provider>>,
    /// The BFL transformer folder to use (`fp32`, `fp16`, `bf16`, `fp8`, `fp4`); `None` picks one for the provider.
    pub transformer_precision: Option<String>,
    /// The declared image size and batch range: TensorRT profiles, and the one static shape of CUDA graphs.
    pub shapes: Option<ShapeRange>,
    pub ep: EpSettings,
}

impl ProvidersLayer {
    /// Puts every setting `top` gives over this layer's.
    pub fn overlay(&mut self, top: &ProvidersLayer) {
        for (dst, src) in [
            (&mut self.order, &top.order),
            (&mut self.transformer_precision, &top.transformer_precision),
        ] {
            if src.is_some() {
                dst.clone_from(src);
            }
        }
        self.device_id = top.device_id.or(self.device_id);
        self.sizes = top.sizes.or(self.sizes);
        self.batch = top.batch.or(self.batch);
        self.tensorrt.overlay(&top.tensorrt);
        self.cuda.overlay(&top.cuda);
        self.directml.overlay(&top.directml);
        self.coreml.overlay(&top.coreml);
    }

    /// The settings of the layers, later ones overriding earlier ones (file, then flags), over the defaults.
    pub fn resolve(layers: &[&ProvidersLayer]) -> Result<ProviderConfig> {
        let mut l = ProvidersLayer::default();
        for top in layers {
            l.overlay(top);
        }
        let order = l
            .order
            .as_deref()
            .map(crate::runtime::parse_list)
            .transpose()?;
        let transformer_precision = match l.transformer_precision.as_deref().map(str::trim) {
            None | Some("auto") | Some("") => None,
            Some(p) => {
                let p = p.to_ascii_lowercase();
                if !BFL_TRANSFORMER_PRECISIONS.contains(&p.as_str()) {
                    return Err(Error::input(format!("unknown transformer precision {p:?}"))
                        .with_hint(format!(
                            "use auto or one of: {}",
                            BFL_TRANSFORMER_PRECISIONS.join(", ")
                        )));
                }
                Some(p)
            }
        };
        let shapes = match (l.sizes, l.batch) {
            (Some(sizes), batch) => Some(ShapeRange {
                sizes,
                batch: batch.unwrap_or(BatchRange {
                    min: 1,
                    opt: None,
                    max: 1,
                }),
            }),
            (None, Some(b)) => {
                return Err(Error::input(format!(
                    "a batch range ({b}) needs an image size range too"
                ))
                .with_hint(
                    "give --trt-sizes (providers.sizes) as well, e.g. --trt-sizes 512-1024",
                ))
            }
            (None, None) => None,
        };
        let ep = EpSettings::resolve(l.device_id, &l.tensorrt, &l.cuda, &l.directml, &l.coreml)?;
        Ok(ProviderConfig {
            order,
            transformer_precision,
            shapes,
            ep,
        })
    }

    /// Makes relative folders relative to `base` (the config file's folder).
    fn anchor_paths(&mut self, base: &Path) {
        for p in [&mut self.tensorrt.cache_dir, &mut self.coreml.cache_dir]
            .into_iter()
            .flatten()
        {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
    }
}

#[derive(Deserialize)]
struct ConfigFile {
    /// Other sections belong to other parts of fluxrt and are not checked here.
    #[serde(default)]
    providers: ProvidersLayer,
}

/// Parses a config file's `[providers]` section (other sections are ignored). An unknown key or a bad value is an
/// [`ErrorKind::InvalidInput`](crate::ErrorKind::InvalidInput) error naming the file, the line and the key.
pub fn parse_config(text: &str, origin: &str) -> Result<ProvidersLayer> {
    toml::from_str::<ConfigFile>(text)
        .map(|c| c.providers)
        .map_err(|e| {
            // The table the bad key sits in: the last `[header]` line before it.
            let section = e
                .span()
                .and_then(|span| {
                    let header = text
                        .get(..span.start)?
                        .lines()
                        .rev()
                        .map(str::trim)
                        .find(|l| l.starts_with('['))?;
                    let end = header.rfind(']')?;
                    Some(format!(" (in {})", &header[..=end]))
                })
                .unwrap_or_default();
            Error::input(format!(
                "config file {origin}{section}: {}",
                e.to_string().trim_end()
            ))
            .with_hint(
                "see docs/providers.md for the keys of the [providers] section and their values",
            )
        })
}

/// Reads a config file's `[providers]` section; relative folders in it are relative to the file's folder.
pub fn load_config(path: &Path) -> Result<ProvidersLayer> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        Error::input(format!(
            "cannot read the config file {}: {e}",
            path.display()
        ))
    })?;
    let mut layer = parse_config(&text, &path.display().to_string())?;
    layer.anchor_paths(path.parent().unwrap_or(Path::new(".")));
    Ok(layer)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;
    use std::path::PathBuf;

    fn layer(toml_text: &str) -> ProvidersLayer {
        parse_config(toml_text, "test.toml").unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn flags_override_the_file_key_by_key() {
        let file = layer(
            r#"
            [providers]
            device_id = 1
            sizes = "512-1024"
            batch = "1-4"
            [providers.tensorrt]
            fp16 = true
            builder_optimization_level = 5
            max_workspace_size = "8GiB"
            cache_dir = "/cache/trt"
            "#,
        );
        // The flags override the file: bf16 on, fp16 off, timing cache off.
        let flags = ProvidersLayer {
            tensorrt: TensorRtLayer {
                fp16: Some(false),
                bf16: Some(true),
                timing_cache: Some(false),
                ..Default::default()
            },
            ..Default::default()
        };
        let c = ProvidersLayer::resolve(&[&file, &flags]).unwrap();
        let t = &c.ep.tensorrt;
        assert_eq!(c.ep.device_id, Some(1));
        assert!(!t.fp16 && t.bf16 && !t.timing_cache);
        assert_eq!(t.builder_optimization_level, 5);
        assert_eq!(t.max_workspace_size, Some(8 << 30));
        assert_eq!(t.cache_dir, Some(PathBuf::from("/cache/trt")));
        let shapes = c.shapes.unwrap();
        assert_eq!(
            (shapes.sizes.to_string(), shapes.batch.to_string()),
            ("512-1024".into(), "1-4".into())
        );
    }

    #[test]
    fn config_errors_name_the_key() {
        let e = parse_config("[providers.tensorrt]\nfp61 = true\n", "my.toml").unwrap_err();
        assert_eq!(e.kind, ErrorKind::InvalidInput);
        assert!(
            e.message.contains("my.toml") && e.message.contains("fp61"),
            "{e}"
        );
        assert!(e.message.contains("line 2"), "{e}");
        assert!(e.message.contains("(in [providers.tensorrt])"), "{e}");
        let e = parse_config("[providers]\nsize = \"512-1024\"\n", "my.toml").unwrap_err();
        assert!(
            e.message.contains("`size`") && e.message.contains("(in [providers])"),
            "{e}"
        );
        let e = parse_config(
            "[providers.cuda]\nconv_algorithm_search = \"fastest\"\n",
            "c.toml",
        )
        .unwrap_err();
        assert!(
            e.message.contains("fastest") && e.message.contains("heuristic"),
            "{e}"
        );
        let e = parse_config("[providers]\nsizes = \"500-1024\"\n", "c.toml").unwrap_err();
        assert!(e.message.contains("500"), "{e}");
        let e = parse_config(
            "[providers.tensorrt]\nmax_workspace_size = \"8 parsecs\"\n",
            "c.toml",
        )
        .unwrap_err();
        assert!(e.message.contains("8 parsecs"), "{e}");
        let e = parse_config("[providers]\ndevice_id = \"zero\"\n", "c.toml").unwrap_err();
        assert!(e.message.contains("device_id"), "{e}");
        // Other sections are someone else's business.
        assert_eq!(layer("[server]\nport = 1\n"), ProvidersLayer::default());
        // Values checked after merging name the setting.
        let e = ProvidersLayer::resolve(&[&layer(
            "[providers.tensorrt]\nbuilder_optimization_level = 9\n",
        )])
        .unwrap_err();
        assert!(
            e.message.contains("optimization level") && e.message.contains('9'),
            "{e}"
        );
        let e = ProvidersLayer::resolve(&[&layer("[providers]\nbatch = \"1-4\"\n")]).unwrap_err();
        assert!(e.hint.as_deref().unwrap().contains("--trt-sizes"), "{e}");
        let e =
            ProvidersLayer::resolve(&[&layer("[providers]\ntransformer_precision = \"int3\"\n")])
                .unwrap_err();
        assert!(e.message.contains("int3"), "{e}");
        let e = ProvidersLayer::resolve(&[&layer("[providers]\norder = \"cuda,vulkan\"\n")])
            .unwrap_err();
        assert!(e.message.contains("vulkan"), "{e}");
    }

    #[test]
    fn full_config_file_parses() {
        let text = include_str!("../docs/providers.example.toml");
        let c = ProvidersLayer::resolve(&[&layer(text)]).unwrap();
        assert_eq!(
            c.order,
            Some(vec![Provider::TensorRt, Provider::Cuda, Provider::Cpu])
        );
        let shapes = c.shapes.unwrap();
        assert_eq!(
            (shapes.sizes.to_string(), shapes.batch.to_string()),
            ("512-1024".into(), "1-4".into())
        );
    }

    #[test]
    fn relative_cache_dirs_follow_the_config_file() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("fluxrt.toml");
        std::fs::write(&p, "[providers.tensorrt]\ncache_dir = \"engines\"\n[providers.coreml]\ncache_dir = \"/abs\"\n").unwrap();
        let l = load_config(&p).unwrap();
        assert_eq!(l.tensorrt.cache_dir, Some(d.path().join("engines")));
        assert_eq!(l.coreml.cache_dir, Some(PathBuf::from("/abs")));
        let e = load_config(&d.path().join("missing.toml")).unwrap_err();
        assert_eq!(e.kind, ErrorKind::InvalidInput);
    }
}
