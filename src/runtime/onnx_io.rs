//! The declared inputs of an ONNX file, read straight from its protobuf (`ModelProto.graph.input`) without ONNX
//! Runtime. Written by hand rather than with a protobuf crate on purpose: those decode the whole message, weights
//! included (24 GB for FLUX.1's transformer), while this reader seeks past every field but the graph's inputs.

use std::io::{BufReader, Read, Seek};
use std::path::Path;

use super::types::{Dim, ElemType, IoInfo};
use crate::{Error, Result};

/// The declared inputs of an ONNX file (name, element type, shape with symbolic names), without ONNX Runtime and
/// without reading weights. Initializers listed as inputs (old exports) appear with their fixed shapes.
pub fn read_declared_inputs(path: &Path) -> Result<Vec<IoInfo>> {
    let bad =
        |why: String| {
            Error::model(format!("cannot read the inputs of {}: {why}", path.display())).with_hint(
            "re-export the graph or re-download the model (the file may be incomplete or damaged)",
        )
        };
    let file = std::fs::File::open(path).map_err(|e| bad(e.to_string()))?;
    let len = file.metadata().map_err(|e| bad(e.to_string()))?.len();
    let mut r = BufReader::new(file);
    let mut inputs = Vec::new();
    let mut pos = 0u64;
    let mut found_graph = false;
    while pos < len {
        let (field, wire) = read_key(&mut r, &mut pos).map_err(bad)?;
        if field == 7 && wire == 2 {
            let n = read_varint(&mut r, &mut pos).map_err(bad)?;
            let end = pos
                .checked_add(n)
                .filter(|&e| e <= len)
                .ok_or_else(|| bad("truncated graph".into()))?;
            found_graph = true;
            while pos < end {
                let (gfield, gwire) = read_key(&mut r, &mut pos).map_err(bad)?;
                if gfield == 11 && gwire == 2 {
                    let n = read_varint(&mut r, &mut pos).map_err(bad)?;
                    if n > 1 << 20 {
                        return Err(bad("an input description larger than 1 MiB".into()));
                    }
                    let mut buf = vec![0u8; n as usize];
                    r.read_exact(&mut buf).map_err(|e| bad(e.to_string()))?;
                    pos += n;
                    inputs.push(parse_value_info(&buf).map_err(bad)?);
                } else {
                    skip(&mut r, &mut pos, gwire).map_err(bad)?;
                }
            }
        } else {
            skip(&mut r, &mut pos, wire).map_err(bad)?;
        }
    }
    if !found_graph {
        return Err(bad("no graph in the file (is it an ONNX model?)".into()));
    }
    Ok(inputs)
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
