//! Property tests of the server's request parsing and validation: no input panics, and a request is
//! accepted exactly when an independent statement of the rules accepts it.

use fluxrt::model::Variant;
use fluxrt::serve::api::{parse_native, parse_openai, Limits, ModelInfo};
use proptest::prelude::*;
use serde_json::{Map, Value};

fn limits() -> Limits {
    Limits {
        max_pixels: 1024 * 1024,
        max_steps: 50,
        max_images: 4,
        max_prompt_chars: 64,
    }
}

fn model(variant: Variant) -> ModelInfo {
    ModelInfo {
        name: "tiny".into(),
        variant,
        width: 256,
        height: 256,
        steps: 4,
        guidance: if variant == Variant::Dev {
            Some(3.5)
        } else {
            None
        },
        vae_factor: 8,
        providers: vec!["cpu".into()],
    }
}

/// JSON values of every kind, biased towards the edges of the valid ranges.
fn any_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        prop_oneof![
            Just(0i64),
            Just(1),
            Just(-1),
            Just(4),
            Just(16),
            Just(50),
            Just(51),
            Just(64),
            Just(1000),
            Just(1024),
            Just(4096),
            Just(65536),
            Just(65552),
            Just(4_294_967_295),
            Just(4_294_967_296),
            Just(i64::MAX),
            Just(i64::MIN),
            -100i64..5000,
        ]
        .prop_map(Value::from),
        prop_oneof![
            Just(0.5f64),
            Just(3.5),
            Just(-0.0),
            Just(100.0),
            Just(100.5),
            Just(1e300),
            Just(-1e300),
            -10.0f64..200.0,
        ]
        .prop_map(Value::from),
        prop_oneof![
            Just("b64_json".to_string()),
            Just("url".to_string()),
            Just("64x64".to_string()),
            Just("256X128".to_string()),
            Just(" 48x32 ".to_string()),
            Just("auto".to_string()),
            Just("-64x64".to_string()),
            Just("65x64".to_string()),
            Just("1x".to_string()),
            Just("x".to_string()),
            Just("4294967295x16".to_string()),
            Just("99999999999x16".to_string()),
            Just("2048x1024".to_string()),
            Just("1024x1024".to_string()),
            "[0-9]{1,5}x[0-9]{1,5}",
            ".{0,80}",
        ]
        .prop_map(Value::from),
    ];
    leaf.prop_recursive(2, 8, 3, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..3).prop_map(Value::from),
            prop::collection::btree_map("[a-z]{1,3}", inner, 0..3)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

const OPENAI_KEYS: &[&str] = &[
    "prompt",
    "model",
    "n",
    "size",
    "response_format",
    "user",
    "seed",
    "steps",
    "guidance",
    "quality",
    "style",
    "moderation",
    "background",
    "output_format",
    "output_compression",
    "stream",
    "partial_images",
    "safety_identifier",
];
const NATIVE_KEYS: &[&str] = &[
    "prompt",
    "prompt_2",
    "width",
    "height",
    "steps",
    "guidance",
    "seed",
    "num_images",
];

/// Objects made of known keys (and sometimes an unknown one) with values of any kind.
fn body(keys: &'static [&'static str]) -> impl Strategy<Value = Map<String, Value>> {
    let known = prop::collection::btree_map(prop::sample::select(keys), any_value(), 0..keys.len());
    let prompt = prop_oneof![
        3 => "[a-z ]{0,20}".prop_map(Value::from),
        1 => ".{60,70}".prop_map(Value::from),
        1 => any_value(),
    ];
    let extra = prop::option::weighted(0.15, ("[a-z_]{1,12}", any_value()));
    (known, prop::option::weighted(0.9, prompt), extra).prop_map(|(known, prompt, extra)| {
        let mut m: Map<String, Value> =
            known.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
        if let Some(p) = prompt {
            m.insert("prompt".into(), p);
        }
        if let Some((k, v)) = extra {
            m.insert(k, v);
        }
        m
    })
}

// The rules, restated: a field absent or null takes its default.

fn opt<'a>(m: &'a Map<String, Value>, k: &str) -> Option<&'a Value> {
    m.get(k).filter(|v| !v.is_null())
}

fn uint(v: Option<&Value>, max: u64) -> Option<Option<u64>> {
    match v {
        None => Some(None),
        Some(v) => v.as_u64().filter(|n| *n <= max).map(Some),
    }
}

fn string_ok(v: Option<&Value>) -> bool {
    v.is_none_or(Value::is_string)
}

fn prompt_ok(v: Option<&Value>, l: &Limits) -> bool {
    v.and_then(Value::as_str)
        .is_some_and(|s| s.chars().count() <= l.max_prompt_chars)
}

fn size_ok(w: u64, h: u64, l: &Limits) -> bool {
    w > 0 && h > 0 && w.is_multiple_of(16) && h.is_multiple_of(16) && w * h <= l.max_pixels
}

fn guidance_ok(v: Option<&Value>) -> bool {
    match v {
        None => true,
        Some(v) => v.as_f64().is_some_and(|g| {
            let g = g as f32;
            g.is_finite() && (0.0..=100.0).contains(&g)
        }),
    }
}

fn common_ok(m: &Map<String, Value>, l: &Limits, count: &str) -> bool {
    let steps = uint(opt(m, "steps"), u64::MAX);
    let n = uint(opt(m, count), u64::MAX);
    prompt_ok(m.get("prompt"), l)
        && steps.is_some_and(|s| s.is_none_or(|s| (1..=l.max_steps as u64).contains(&s)))
        && n.is_some_and(|n| n.is_none_or(|n| (1..=l.max_images as u64).contains(&n)))
        && uint(opt(m, "seed"), u64::MAX).is_some()
        && guidance_ok(opt(m, "guidance"))
}

fn openai_valid(m: &Map<String, Value>, l: &Limits) -> bool {
    if m.keys().any(|k| !OPENAI_KEYS.contains(&k.as_str())) {
        return false;
    }
    let size = match opt(m, "size") {
        None => true,
        Some(Value::String(s)) if s.trim().eq_ignore_ascii_case("auto") => true,
        Some(Value::String(s)) => {
            let t = s.trim().to_ascii_lowercase();
            match t.split_once('x') {
                Some((w, h)) => match (w.trim().parse::<u32>(), h.trim().parse::<u32>()) {
                    (Ok(w), Ok(h)) => size_ok(w as u64, h as u64, l),
                    _ => false,
                },
                None => false,
            }
        }
        Some(_) => false,
    };
    let format = match opt(m, "response_format") {
        None => true,
        Some(v) => v.as_str() == Some("b64_json"),
    };
    // OpenAI's fields: one of the documented values this server serves (no transparency, raster formats, no
    // streaming), or absent.
    let one_of = |k: &str, values: &[&str]| {
        opt(m, k).is_none_or(|v| v.as_str().is_some_and(|s| values.contains(&s)))
    };
    let openai_fields = one_of(
        "quality",
        &[
            "auto", "low", "medium", "high", "xhigh", "max", "standard", "hd",
        ],
    ) && one_of("style", &["vivid", "natural"])
        && one_of("moderation", &["auto", "low"])
        && one_of("background", &["auto", "opaque"])
        && one_of("output_format", &["png", "jpeg", "webp"])
        && uint(opt(m, "output_compression"), 100).is_some()
        && uint(opt(m, "partial_images"), 3).is_some()
        && opt(m, "stream").is_none_or(|v| v == &Value::Bool(false))
        && string_ok(opt(m, "safety_identifier"));
    size && format
        && openai_fields
        && string_ok(opt(m, "model"))
        && string_ok(opt(m, "user"))
        && common_ok(m, l, "n")
}

fn native_valid(m: &Map<String, Value>, l: &Limits) -> bool {
    if m.keys().any(|k| !NATIVE_KEYS.contains(&k.as_str())) {
        return false;
    }
    let side = |k: &str| uint(opt(m, k), u32::MAX as u64).map(|v| v.unwrap_or(256));
    let size = matches!((side("width"), side("height")), (Some(w), Some(h)) if size_ok(w, h, l));
    let p2 = match opt(m, "prompt_2") {
        None => true,
        Some(v) => prompt_ok(Some(v), l),
    };
    size && p2 && common_ok(m, l, "num_images")
}

/// What every accepted request satisfies, whatever the input.
fn check_accepted(r: &fluxrt::pipeline::Request, l: &Limits, variant: Variant) {
    assert!(
        r.width > 0 && r.height > 0 && r.width.is_multiple_of(16) && r.height.is_multiple_of(16)
    );
    assert!(r.width as u64 * r.height as u64 <= l.max_pixels);
    assert!((1..=l.max_steps).contains(&r.steps));
    assert!((1..=l.max_images).contains(&r.num_images));
    match variant {
        Variant::Schnell => assert_eq!(r.guidance, None),
        Variant::Dev => assert!(r.guidance.is_some_and(|g| (0.0..=100.0).contains(&g))),
    }
    r.validate(8)
        .expect("the library accepts what the server accepted");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn openai_bodies_are_accepted_exactly_when_valid(m in body(OPENAI_KEYS), dev in any::<bool>()) {
        let l = limits();
        let variant = if dev { Variant::Dev } else { Variant::Schnell };
        let bytes = serde_json::to_vec(&Value::Object(m.clone())).unwrap();
        let got = parse_openai(&bytes, &l, &model(variant), 42);
        prop_assert_eq!(got.is_ok(), openai_valid(&m, &l), "{} -> {:?}", Value::Object(m.clone()), got.as_ref().err());
        match got {
            Ok((p, _)) => check_accepted(&p.request, &l, variant),
            Err(e) => {
                prop_assert!([400u16, 422].contains(&e.status.as_u16()));
                prop_assert!(!e.message.is_empty());
                if let Some(unknown) = m.keys().find(|k| !OPENAI_KEYS.contains(&k.as_str())) {
                    // An unknown field is named, unless another field failed first.
                    prop_assert!(e.param.is_some(), "{:?} ({unknown})", e);
                }
            }
        }
    }

    #[test]
    fn native_bodies_are_accepted_exactly_when_valid(m in body(NATIVE_KEYS), dev in any::<bool>()) {
        let l = limits();
        let variant = if dev { Variant::Dev } else { Variant::Schnell };
        let bytes = serde_json::to_vec(&Value::Object(m.clone())).unwrap();
        let got = parse_native(&bytes, &l, &model(variant), 42);
        prop_assert_eq!(got.is_ok(), native_valid(&m, &l), "{} -> {:?}", Value::Object(m.clone()), got.as_ref().err());
        if let Ok(p) = got {
            check_accepted(&p.request, &l, variant);
            let seed = opt(&m, "seed").and_then(Value::as_u64).unwrap_or(42);
            prop_assert_eq!(p.request.seed, seed);
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        let l = limits();
        for r in [
            parse_openai(&bytes, &l, &model(Variant::Schnell), 0).map(|(p, _)| p),
            parse_native(&bytes, &l, &model(Variant::Dev), 0),
        ] {
            if let Err(e) = r {
                prop_assert!([400u16, 422].contains(&e.status.as_u16()));
            }
        }
    }

    #[test]
    fn any_json_value_never_panics(v in any_value()) {
        let l = limits();
        let bytes = serde_json::to_vec(&v).unwrap();
        let _ = parse_openai(&bytes, &l, &model(Variant::Schnell), 0);
        let _ = parse_native(&bytes, &l, &model(Variant::Schnell), 0);
    }
}
