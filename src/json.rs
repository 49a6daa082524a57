//! JSON output helpers.

/// An f32 as a JSON number with the shortest decimal that reads back as the same f32 (`0.8`, not the
/// `0.800000011920929` that widening it to f64 prints); `null` for NaN or infinity, which JSON has no number for.
pub fn f32_number(x: f32) -> serde_json::Value {
    x.to_string()
        .parse::<f64>()
        .ok()
        .and_then(serde_json::Number::from_f64)
        .map_or(serde_json::Value::Null, serde_json::Value::Number)
}

/// [`f32_number`] of an optional value (`null` for `None`).
pub fn opt_f32_number(x: Option<f32>) -> serde_json::Value {
    x.map_or(serde_json::Value::Null, f32_number)
}

/// A duration in milliseconds, rounded to the microsecond, for timings in JSON reports.
pub fn ms(d: std::time::Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f32_values_print_as_given() {
        assert_eq!(f32_number(0.8).to_string(), "0.8");
        assert_eq!(f32_number(-1.25).to_string(), "-1.25");
        assert_eq!(f32_number(3.5).to_string(), "3.5");
        assert_eq!(f32_number(1e-7).to_string(), "1e-7");
        assert_eq!(f32_number(f32::NAN), serde_json::Value::Null);
        assert_eq!(opt_f32_number(None), serde_json::Value::Null);
        // What the plain conversion prints, which this avoids.
        assert_eq!(serde_json::json!(0.8f32).to_string(), "0.800000011920929");
    }
}
