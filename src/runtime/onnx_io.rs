//! What an ONNX file declares, read straight from its protobuf without ONNX Runtime: the graph's inputs and
//! outputs, the operator domains it imports, the ops it uses from non-standard domains, and how many bytes of each
//! external-data file its initializers point into. Written by hand rather than with a protobuf crate on purpose:
//! those decode the whole message, weights included (24 GB for FLUX.1's transformer), while this reader seeks past
//! every weight.
//!
//! [`check_complete`] uses it to tell an unfinished download (a Git LFS pointer instead of the file, an
//! external-data file shorter than the graph needs) from a damaged file, before ONNX Runtime says something generic.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufReader, Read, Seek};
use std::path::{Path, PathBuf};

use super::types::{Dim, ElemType, IoInfo};
use crate::{Error, Result};

/// What [`read_summary`] finds in one ONNX file.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GraphSummary {
    pub inputs: Vec<IoInfo>,
    pub outputs: Vec<IoInfo>,
    /// `opset_import`: domain (`""` is the default ONNX domain) and version.
    pub opsets: Vec<(String, i64)>,
    /// Op types used per domain, for every domain but the standard ones (`""`, `ai.onnx`, `com.microsoft`).
    pub custom_ops: BTreeMap<String, BTreeSet<String>>,
    /// External-data files the initializers refer to (relative to the model file), with the least length each
    /// must have (the largest offset + length).
    pub external: BTreeMap<String, u64>,
}

/// The first bytes of a file Git LFS has not fetched yet.
pub const LFS_POINTER_PREFIX: &[u8] = b"version https://git-lfs.github.com/spec/v1";

/// The declared inputs of an ONNX file (name, element type, shape with symbolic names), without ONNX Runtime and
/// without reading weights. Initializers listed as inputs (old exports) appear with their fixed shapes.
pub fn read_declared_inputs(path: &Path) -> Result<Vec<IoInfo>> {
    Ok(read_summary(path)?.inputs)
}

/// Reads `path`'s [`GraphSummary`]; a file that is no ONNX model is an [`Error::model`] naming it.
pub fn read_summary(path: &Path) -> Result<GraphSummary> {
    let bad = |why: String| {
        Error::model(format!("cannot read the graph {}: {why}", path.display())).with_hint(
            "re-export the graph or re-download the model (the file may be incomplete or damaged)",
        )
    };
    let file = std::fs::File::open(path).map_err(|e| bad(e.to_string()))?;
    let len = file.metadata().map_err(|e| bad(e.to_string()))?.len();
    let mut r = BufReader::new(file);
    let mut summary = GraphSummary::default();
    let mut pos = 0u64;
    let mut found_graph = false;
    while pos < len {
        let (field, wire) = read_key(&mut r, &mut pos).map_err(bad)?;
        match (field, wire) {
            (7, 2) => {
                let end = message_end(&mut r, &mut pos, len).map_err(bad)?;
                found_graph = true;
                read_graph(&mut r, &mut pos, end, &mut summary).map_err(bad)?;
            }
            (8, 2) => {
                let buf = read_small(&mut r, &mut pos, "an opset import").map_err(bad)?;
                let mut domain = String::new();
                let mut version = 0i64;
                for (f, v, b) in fields(&buf).map_err(bad)? {
                    match f {
                        1 => domain = String::from_utf8_lossy(b).into_owned(),
                        2 => version = v as i64,
                        _ => {}
                    }
                }
                summary.opsets.push((domain, version));
            }
            _ => skip(&mut r, &mut pos, wire).map_err(bad)?,
        }
    }
    if !found_graph {
        return Err(bad("no graph in the file (is it an ONNX model?)".into()));
    }
    Ok(summary)
}

/// Checks that `path` and every external-data file it names are complete downloads: none is a Git LFS pointer,
/// each data file exists and is as long as the graph's offsets need. Returns the summary read on the way. Each
/// failure names the file and the fix.
pub fn check_complete(path: &Path) -> Result<GraphSummary> {
    if std::fs::metadata(path).is_ok_and(|m| m.len() == 0) {
        return Err(Error::model(format!(
            "the graph {} is empty (0 bytes): an interrupted download or export",
            path.display()
        ))
        .with_hint("re-export the graph or re-download the model"));
    }
    if let Some(size) = lfs_pointer(path) {
        return Err(lfs_error(path, size));
    }
    let summary = read_summary(path)?;
    let dir = path.parent().unwrap_or(Path::new("."));
    for (location, &needed) in &summary.external {
        let data = dir.join(location);
        if let Some(size) = lfs_pointer(&data) {
            return Err(lfs_error(&data, size));
        }
        let have = match std::fs::metadata(&data) {
            Ok(m) => m.len(),
            Err(_) => {
                return Err(Error::model(format!(
                    "the external data file {} of {} is missing (the graph keeps its weights there)",
                    data.display(),
                    path.display()
                ))
                .with_hint(
                    "download it too and keep it beside the .onnx file (the folder is incomplete), or re-export                      the model",
                ))
            }
        };
        if have < needed {
            return Err(Error::model(format!(
                "the external data file {} is {have} bytes, but {} needs at least {needed}: the download is \
                 incomplete ({:.1} % there)",
                data.display(),
                path.display(),
                have as f64 * 100.0 / needed as f64
            ))
            .with_hint("finish or repeat the download of that file (`hf download` resumes partial files)"));
        }
    }
    Ok(summary)
}

/// `Some(size)` when `path` is a Git LFS pointer file (`size` is the real file's, when the pointer says it).
fn lfs_pointer(path: &Path) -> Option<Option<u64>> {
    let mut head = [0u8; 256];
    let mut f = std::fs::File::open(path).ok()?;
    let n = f.read(&mut head).ok()?;
    let head = &head[..n];
    if !head.starts_with(LFS_POINTER_PREFIX) {
        return None;
    }
    let text = String::from_utf8_lossy(head);
    Some(
        text.lines()
            .find_map(|l| l.strip_prefix("size "))
            .and_then(|s| s.trim().parse().ok()),
    )
}

fn lfs_error(path: &Path, size: Option<u64>) -> Error {
    let real = size.map_or(String::new(), |s| {
        format!(" (the real file is {:.2} GB)", s as f64 / 1e9)
    });
    Error::model(format!(
        "{} is a Git LFS pointer, not the file itself{real}: the download is not finished",
        path.display()
    ))
    .with_hint(
        "fetch the real files: `git lfs pull` in a git clone, or download with `hf download <repo> --local-dir DIR` \
         (huggingface_hub), which fetches LFS files",
    )
}

/// The end offset of the length-delimited message starting at `pos`.
fn message_end<R: Read>(r: &mut R, pos: &mut u64, limit: u64) -> PbResult<u64> {
    let n = read_varint(r, pos)?;
    pos.checked_add(n)
        .filter(|&e| e <= limit)
        .ok_or_else(|| "truncated message".to_string())
}

/// A length-delimited field read into memory: only for small messages (names, shapes, node headers).
fn read_small<R: Read>(r: &mut R, pos: &mut u64, what: &str) -> PbResult<Vec<u8>> {
    let n = read_varint(r, pos)?;
    if n > 1 << 20 {
        return Err(format!("{what} larger than 1 MiB"));
    }
    let mut buf = vec![0u8; n as usize];
    r.read_exact(&mut buf)
        .map_err(|_| "unexpected end of file".to_string())?;
    *pos += n;
    Ok(buf)
}

/// GraphProto { node = 1; initializer = 5; input = 11; output = 12 }: weights are skipped, never read.
fn read_graph<R: Read + Seek>(
    r: &mut BufReader<R>,
    pos: &mut u64,
    end: u64,
    out: &mut GraphSummary,
) -> PbResult<()> {
    while *pos < end {
        let (field, wire) = read_key(r, pos)?;
        match (field, wire) {
            (11, 2) => out.inputs.push(parse_value_info(&read_small(
                r,
                pos,
                "an input description",
            )?)?),
            (12, 2) => out.outputs.push(parse_value_info(&read_small(
                r,
                pos,
                "an output description",
            )?)?),
            (1, 2) => {
                let node_end = message_end(r, pos, end)?;
                if let Some((domain, op)) = read_node_op(r, pos, node_end)? {
                    out.custom_ops.entry(domain).or_default().insert(op);
                }
            }
            (5, 2) => {
                let t_end = message_end(r, pos, end)?;
                if let Some((location, needed)) = read_external_ref(r, pos, t_end)? {
                    let e = out.external.entry(location).or_default();
                    *e = (*e).max(needed);
                }
            }
            _ => skip(r, pos, wire)?,
        }
    }
    Ok(())
}

const STANDARD_DOMAINS: [&str; 3] = ["", "ai.onnx", "com.microsoft"];

/// NodeProto { op_type = 4; domain = 7 }: the node's (domain, op) when its domain is not a standard one.
fn read_node_op<R: Read + Seek>(
    r: &mut BufReader<R>,
    pos: &mut u64,
    end: u64,
) -> PbResult<Option<(String, String)>> {
    let (mut op, mut domain) = (String::new(), String::new());
    while *pos < end {
        let (field, wire) = read_key(r, pos)?;
        match (field, wire) {
            (4, 2) => op = String::from_utf8_lossy(&read_small(r, pos, "an op type")?).into_owned(),
            (7, 2) => {
                domain = String::from_utf8_lossy(&read_small(r, pos, "a domain")?).into_owned()
            }
            _ => skip(r, pos, wire)?,
        }
    }
    Ok((!STANDARD_DOMAINS.contains(&domain.as_str())).then_some((domain, op)))
}

/// TensorProto { raw_data = 9; external_data = 13 (key = 1, value = 2); data_location = 14 }: where an
/// externally stored initializer lives, as (location, offset + length). Inline weights are seeked past.
fn read_external_ref<R: Read + Seek>(
    r: &mut BufReader<R>,
    pos: &mut u64,
    end: u64,
) -> PbResult<Option<(String, u64)>> {
    let (mut location, mut offset, mut length) = (None, 0u64, 0u64);
    let mut external = false;
    while *pos < end {
        let (field, wire) = read_key(r, pos)?;
        match (field, wire) {
            (13, 2) => {
                let entry = read_small(r, pos, "an external-data entry")?;
                let (mut key, mut value) = (String::new(), String::new());
                for (f, _, b) in fields(&entry)? {
                    match f {
                        1 => key = String::from_utf8_lossy(b).into_owned(),
                        2 => value = String::from_utf8_lossy(b).into_owned(),
                        _ => {}
                    }
                }
                let number = || {
                    value
                        .trim()
                        .parse::<u64>()
                        .map_err(|_| format!("bad external-data {key} `{value}`"))
                };
                match key.as_str() {
                    "location" => location = Some(value.clone()),
                    "offset" => offset = number()?,
                    "length" => length = number()?,
                    _ => {}
                }
            }
            (14, 0) => external = read_varint(r, pos)? == 1,
            _ => skip(r, pos, wire)?,
        }
    }
    Ok(match location {
        Some(l) if external => Some((l, offset.saturating_add(length))),
        _ => None,
    })
}

/// The external-data files of `path`'s graph, as paths.
pub fn external_files(path: &Path, summary: &GraphSummary) -> Vec<PathBuf> {
    let dir = path.parent().unwrap_or(Path::new("."));
    summary.external.keys().map(|l| dir.join(l)).collect()
}

type PbResult<T> = std::result::Result<T, String>;

fn read_varint(r: &mut impl Read, pos: &mut u64) -> PbResult<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let mut b = [0u8; 1];
        r.read_exact(&mut b)
            .map_err(|_| "unexpected end of file".to_string())?;
        *pos += 1;
        v |= u64::from(b[0] & 0x7f) << shift;
        if b[0] & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err("malformed varint".into())
}

fn read_key(r: &mut impl Read, pos: &mut u64) -> PbResult<(u64, u8)> {
    let k = read_varint(r, pos)?;
    Ok((k >> 3, (k & 7) as u8))
}

fn skip<R: Read + Seek>(r: &mut BufReader<R>, pos: &mut u64, wire: u8) -> PbResult<()> {
    let n = match wire {
        0 => {
            read_varint(r, pos)?;
            return Ok(());
        }
        1 => 8,
        2 => read_varint(r, pos)?,
        5 => 4,
        w => return Err(format!("unsupported protobuf wire type {w}")),
    };
    let n = i64::try_from(n).map_err(|_| "field too large".to_string())?;
    r.seek_relative(n).map_err(|e| e.to_string())?;
    *pos += n as u64;
    Ok(())
}

/// Fields of one length-delimited message in memory: (field, wire, varint value or byte range).
fn fields(buf: &[u8]) -> PbResult<Vec<(u64, u64, &[u8])>> {
    let mut out = Vec::new();
    let mut c = std::io::Cursor::new(buf);
    let mut pos = 0u64;
    while (pos as usize) < buf.len() {
        let (f, w) = read_key(&mut c, &mut pos)?;
        match w {
            0 => {
                let v = read_varint(&mut c, &mut pos)?;
                out.push((f, v, &buf[0..0]));
            }
            1 | 5 => {
                pos += if w == 1 { 8 } else { 4 };
                c.set_position(pos);
            }
            2 => {
                let n = read_varint(&mut c, &mut pos)? as usize;
                let start = pos as usize;
                let end = start
                    .checked_add(n)
                    .filter(|&e| e <= buf.len())
                    .ok_or("truncated field")?;
                out.push((f, 0, &buf[start..end]));
                pos = end as u64;
                c.set_position(pos);
            }
            w => return Err(format!("unsupported protobuf wire type {w}")),
        }
    }
    Ok(out)
}

fn onnx_elem_type(t: u64) -> ElemType {
    match t {
        1 => ElemType::F32,
        10 => ElemType::F16,
        16 => ElemType::BF16,
        6 => ElemType::I32,
        7 => ElemType::I64,
        other => ElemType::Other(
            match other {
                2 => "u8",
                3 => "i8",
                4 => "u16",
                5 => "i16",
                8 => "string",
                9 => "bool",
                11 => "f64",
                12 => "u32",
                13 => "u64",
                17..=20 => "f8",
                21 | 22 | 25 | 26 => "int4",
                23 => "fp4",
                _ => "unknown",
            }
            .to_string(),
        ),
    }
}

/// ValueInfoProto { name = 1; type = 2 (TypeProto { tensor_type = 1 (elem_type = 1; shape = 2 { dim = 1
/// { dim_value = 1 | dim_param = 2 } }) }) }
fn parse_value_info(buf: &[u8]) -> PbResult<IoInfo> {
    let mut info = IoInfo {
        name: String::new(),
        dtype: ElemType::Other("non-tensor".into()),
        shape: Vec::new(),
    };
    for (f, _, bytes) in fields(buf)? {
        match f {
            1 => info.name = String::from_utf8_lossy(bytes).into_owned(),
            2 => {
                for (tf, _, tensor) in fields(bytes)? {
                    if tf != 1 {
                        continue;
                    }
                    for (ff, v, b) in fields(tensor)? {
                        match ff {
                            1 => info.dtype = onnx_elem_type(v),
                            2 => {
                                for (df, _, dim) in fields(b)? {
                                    if df != 1 {
                                        continue;
                                    }
                                    let mut d = Dim::Symbolic("?".into());
                                    for (xf, xv, xb) in fields(dim)? {
                                        match xf {
                                            1 => d = Dim::Fixed(xv as i64),
                                            2 if !xb.is_empty() => {
                                                d = Dim::Symbolic(
                                                    String::from_utf8_lossy(xb).into_owned(),
                                                )
                                            }
                                            _ => {}
                                        }
                                    }
                                    info.shape.push(d);
                                }
                            }
                            _ => {}
                        }
                    }
                }
            }
            _ => {}
        }
    }
    Ok(info)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Protobuf encoding for test files: a length-delimited field, a varint field.
    fn ld(field: u64, body: &[u8]) -> Vec<u8> {
        let mut out = varint((field << 3) | 2);
        out.extend(varint(body.len() as u64));
        out.extend_from_slice(body);
        out
    }

    fn vi(field: u64, v: u64) -> Vec<u8> {
        let mut out = varint(field << 3);
        out.extend(varint(v));
        out
    }

    fn varint(mut v: u64) -> Vec<u8> {
        let mut out = Vec::new();
        loop {
            let b = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                out.push(b);
                return out;
            }
            out.push(b | 0x80);
        }
    }

    /// A model with one input, one output, a `trt`-domain node and two initializers in `weights.bin`
    /// (bytes 0..64 and 64..160), plus an inline one.
    fn model_bytes() -> Vec<u8> {
        let entry = |k: &str, v: &str| ld(13, &[ld(1, k.as_bytes()), ld(2, v.as_bytes())].concat());
        let ext = |offset: &str, length: &str| {
            [
                ld(8, b"w"),
                vi(2, 16),
                entry("location", "weights.bin"),
                entry("offset", offset),
                entry("length", length),
                vi(14, 1),
            ]
            .concat()
        };
        let tensor_type =
            |elem: u64| ld(2, &ld(1, &[vi(1, elem), ld(2, &ld(1, &vi(1, 4)))].concat()));
        let graph = [
            ld(
                1,
                &[
                    ld(1, b"x"),
                    ld(2, b"y"),
                    ld(4, b"TRT_FP8QuantizeLinear"),
                    ld(7, b"trt"),
                ]
                .concat(),
            ),
            ld(1, &[ld(4, b"MatMul")].concat()),
            ld(5, &ext("0", "64")),
            ld(5, &ext("64", "96")),
            ld(
                5,
                &[ld(8, b"inline"), vi(2, 1), ld(9, &[0u8; 4096])].concat(),
            ),
            ld(11, &[ld(1, b"x"), tensor_type(16)].concat()),
            ld(12, &[ld(1, b"y"), tensor_type(1)].concat()),
        ]
        .concat();
        [
            vi(1, 9),
            ld(7, &graph),
            ld(8, &[ld(1, b"trt"), vi(2, 1)].concat()),
            ld(8, &vi(2, 18)),
        ]
        .concat()
    }

    #[test]
    fn summary_reads_io_domains_and_external_needs() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("model.onnx");
        std::fs::write(&p, model_bytes()).unwrap();
        let s = read_summary(&p).unwrap();
        assert_eq!(s.inputs.len(), 1);
        assert_eq!(s.inputs[0].dtype, ElemType::BF16);
        assert_eq!(s.inputs[0].shape, vec![Dim::Fixed(4)]);
        assert_eq!(s.outputs[0].dtype, ElemType::F32);
        assert_eq!(s.opsets, vec![("trt".to_string(), 1), (String::new(), 18)]);
        assert_eq!(
            s.custom_ops["trt"].iter().collect::<Vec<_>>(),
            ["TRT_FP8QuantizeLinear"]
        );
        assert_eq!(s.custom_ops.len(), 1, "standard domains are not listed");
        assert_eq!(s.external["weights.bin"], 160);
        assert_eq!(external_files(&p, &s), [d.path().join("weights.bin")]);
    }

    #[test]
    fn unfinished_downloads_are_named() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("model.onnx");
        std::fs::write(&p, model_bytes()).unwrap();
        let e = check_complete(&p).unwrap_err();
        assert!(
            e.message.contains("weights.bin") && e.message.contains("missing"),
            "{e}"
        );
        std::fs::write(d.path().join("weights.bin"), [0u8; 100]).unwrap();
        let e = check_complete(&p).unwrap_err();
        assert!(
            e.message.contains("100 bytes")
                && e.message.contains("at least 160")
                && e.message.contains("incomplete"),
            "{e}"
        );
        std::fs::write(d.path().join("weights.bin"), [0u8; 160]).unwrap();
        check_complete(&p).unwrap();
        // A pointer in place of the data file, then of the graph itself.
        let pointer =
            "version https://git-lfs.github.com/spec/v1\noid sha256:ab\nsize 23800000000\n";
        std::fs::write(d.path().join("weights.bin"), pointer).unwrap();
        let e = check_complete(&p).unwrap_err();
        assert!(
            e.message.contains("weights.bin") && e.message.contains("Git LFS pointer"),
            "{e}"
        );
        assert!(e.message.contains("23.80 GB"), "{e}");
        assert!(e.hint.as_deref().unwrap().contains("git lfs pull"), "{e:?}");
        std::fs::write(&p, pointer).unwrap();
        let e = check_complete(&p).unwrap_err();
        assert!(e.message.contains("model.onnx is a Git LFS pointer"), "{e}");
        std::fs::write(&p, b"").unwrap();
        let e = check_complete(&p).unwrap_err();
        assert!(e.message.contains("is empty (0 bytes)"), "{e}");
    }

    #[test]
    fn a_truncated_graph_is_an_error_not_a_panic() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("model.onnx");
        let bytes = model_bytes();
        for cut in [3, bytes.len() / 2, bytes.len() - 5] {
            std::fs::write(&p, &bytes[..cut]).unwrap();
            let e = read_summary(&p).unwrap_err();
            assert_eq!(e.kind, crate::ErrorKind::Model, "cut at {cut}");
        }
    }

    #[test]
    fn reader_refuses_non_onnx_files() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("x.onnx");
        std::fs::write(&p, b"<html>404</html>").unwrap();
        let e = read_declared_inputs(&p).unwrap_err();
        assert_eq!(e.kind, crate::ErrorKind::Model);
        assert!(e.message.contains("x.onnx"), "{e}");
        let e = read_declared_inputs(&d.path().join("missing.onnx")).unwrap_err();
        assert!(e.message.contains("missing.onnx"), "{e}");
    }
}
