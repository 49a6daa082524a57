//! Element-type conversion at the session boundary: fluxrt hands f32/i64 arrays to every graph and gets f32 back,
//! whatever the graph declares (f16, bf16, i32 inputs; f16, bf16, f64, integer outputs).

use std::fmt;

use half::{bf16, f16};
use ndarray::{ArrayD, ArrayViewD, IxDyn};
use ort::session::SessionInputValue;
use ort::value::{DynValue, Tensor, TensorElementType, TensorRef, ValueType};

use super::session::Outputs;
use super::types::{ElemType, TensorIn};

/// `t` as a session input of the `declared` type (zero-copy when it already is, contiguous).
pub(super) fn convert_input<'v>(
    t: &TensorIn<'v>,
    declared: &ElemType,
) -> std::result::Result<SessionInputValue<'v>, String> {
    let ort_err = |e: ort::Error| e.to_string();
    match (t, declared) {
        (TensorIn::F32(a), ElemType::F32) => as_declared(a),
        (TensorIn::F32(a), ElemType::F16) => owned(a, f16::from_f32),
        (TensorIn::F32(a), ElemType::BF16) => owned(a, bf16::from_f32),
        (TensorIn::I64(a), ElemType::I64) => as_declared(a),
        (TensorIn::I64(a), ElemType::I32) => {
            let mut out = Vec::with_capacity(a.len());
            for &v in a.iter() {
                out.push(
                    i32::try_from(v)
                        .map_err(|_| format!("value {v} does not fit the declared i32"))?,
                );
            }
            let arr = ArrayD::from_shape_vec(IxDyn(a.shape()), out).map_err(|e| e.to_string())?;
            Ok(Tensor::from_array(arr).map_err(ort_err)?.into())
        }
        (t, declared) => Err(format!(
            "fluxrt cannot feed {} data to a {declared} input",
            t.kind()
        )),
    }
}

/// An array already of the declared type: zero-copy when contiguous, else copied into standard layout.
fn as_declared<'v, T>(a: &ArrayViewD<'v, T>) -> std::result::Result<SessionInputValue<'v>, String>
where
    T: ort::value::PrimitiveTensorElementType + Clone + fmt::Debug + 'static,
{
    let err = |e: ort::Error| e.to_string();
    Ok(match a.as_slice() {
        Some(_) => TensorRef::from_array_view(a.clone()).map_err(err)?.into(),
        None => Tensor::from_array(a.as_standard_layout().into_owned())
            .map_err(err)?
            .into(),
    })
}

fn owned<'v, T>(
    a: &ArrayViewD<'_, f32>,
    f: impl Fn(f32) -> T,
) -> std::result::Result<SessionInputValue<'v>, String>
where
    T: ort::value::PrimitiveTensorElementType + Clone + fmt::Debug + 'static,
{
    // `iter()` walks in logical order, so the result is in standard layout whatever `a`'s strides are.
    let data: Vec<T> = a.iter().map(|&x| f(x)).collect();
    let arr = ArrayD::from_shape_vec(IxDyn(a.shape()), data).map_err(|e| e.to_string())?;
    Ok(Tensor::from_array(arr).map_err(|e| e.to_string())?.into())
}

/// Copies every output out of the session's memory, as f32. `Err((name, type))` for an unconvertible output.
pub(super) fn collect_outputs<'a>(
    outs: impl Iterator<Item = (&'a str, DynValue)>,
) -> std::result::Result<Outputs, (String, String)> {
    let mut result = Vec::new();
    for (name, value) in outs {
        let arr =
            output_to_f32(&value).ok_or_else(|| (name.to_string(), value.dtype().to_string()))?;
        result.push((name.to_string(), arr));
    }
    Ok(result)
}

fn output_to_f32(v: &DynValue) -> Option<ArrayD<f32>> {
    let ValueType::Tensor { ty, .. } = v.dtype() else {
        return None;
    };
    Some(match ty {
        TensorElementType::Float32 => v.try_extract_array::<f32>().ok()?.to_owned(),
        TensorElementType::Float16 => v.try_extract_array::<f16>().ok()?.mapv(f16::to_f32),
        TensorElementType::Bfloat16 => v.try_extract_array::<bf16>().ok()?.mapv(bf16::to_f32),
        TensorElementType::Float64 => v.try_extract_array::<f64>().ok()?.mapv(|x| x as f32),
        TensorElementType::Int32 => v.try_extract_array::<i32>().ok()?.mapv(|x| x as f32),
        TensorElementType::Int64 => v.try_extract_array::<i64>().ok()?.mapv(|x| x as f32),
        _ => return None,
    })
}
