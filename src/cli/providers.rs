//! `fluxrt providers`: what the loaded ONNX Runtime offers and what works on this machine.

use std::path::PathBuf;

use clap::Args as ClapArgs;
use fluxrt::runtime::{self, Provider};
use fluxrt::Result;
use serde_json::json;

use super::common::{print_json, print_out};

#[derive(ClapArgs, Debug)]
pub struct Args {
    /// ONNX Runtime library (file or folder).
    #[arg(long, value_name = "PATH")]
    ort_lib: Option<PathBuf>,
    /// Print the same as JSON on stdout.
    #[arg(long)]
    json: bool,
}

const ALL: [Provider; 8] = [
    Provider::TensorRt,
    Provider::Cuda,
    Provider::DirectMl,
    Provider::CoreMl,
    Provider::Rocm,
    Provider::MiGraphX,
    Provider::OpenVino,
    Provider::Cpu,
];

pub fn run(a: Args) -> Result<()> {
    let lib = runtime::init(a.ort_lib.as_deref())?;
    let in_library = runtime::available_in_library();
    let plan = runtime::probe(&ALL, true).or_else(|_| runtime::probe(&ALL, false))?;
    let rows: Vec<_> = ALL
        .iter()
        .map(|p| {
            let why = plan
                .rejected
                .iter()
                .find(|(r, _)| r == p)
                .map(|(_, w)| w.clone());
            (
                p,
                runtime::compiled_in(*p),
                in_library.iter().any(|n| n == p.ort_name()),
                why,
            )
        })
        .collect();
    if a.json {
        print_json(&json!({
            "library": lib.path(),
            "version": lib.version(),
            "found_via": lib.source(),
            "available_in_library": in_library,
            "providers": rows.iter().map(|(p, compiled, inlib, why)| json!({
                "name": p.name(),
                "compiled_into_fluxrt": compiled,
                "in_library": inlib,
                "usable": why.is_none(),
                "reason": why,
            })).collect::<Vec<_>>(),
        }))?;
        return Ok(());
    }
    let mut text = format!(
        "ONNX Runtime {} at {} (found via {})\nlibrary offers: {}\n",
        lib.version(),
        lib.path().display(),
        lib.source(),
        in_library.join(", ")
    );
    for (p, compiled, inlib, why) in rows {
        let status = match &why {
            None => "usable".to_string(),
            Some(w) => format!("not usable: {w}"),
        };
        text += &format!(
            "  {:10} fluxrt build: {:3}  library: {:3}  {status}\n",
            p.name(),
            yes(compiled),
            yes(inlib)
        );
    }
    print_out(&text)
}

fn yes(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}
