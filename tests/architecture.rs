//! The layering of docs/architecture.md, checked on the source: each module of `src/` imports only modules of its
//! own layer or below, and no two top-level modules import each other (directly or around a loop). A new module
//! needs a row in LAYERS (and in the doc's table).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Top-level module -> layer, bottom up (docs/architecture.md).
const LAYERS: &[(&str, u8)] = &[
    ("error", 0),
    ("json", 0),
    ("noise", 0),
    ("output", 0),
    ("embeddings", 0),
    ("runtime", 1),
    ("text", 2),
    ("schedule", 2),
    ("latents", 2),
    ("vae_tiling", 2),
    ("init_image", 2),
    ("model", 3),
    ("config", 3),
    ("lora", 4),
    ("request", 4),
    ("guidance", 4),
    ("img2img", 4),
    ("image_out", 4),
    ("engine", 5),
    ("denoise", 6),
    ("conditioning", 7),
    ("pipeline", 8),
    ("bench", 9),
    ("serve", 9),
];

/// The top-level modules `source` names through `crate::` paths (`use` trees included), its tests left out.
fn crate_imports(source: &str) -> BTreeSet<String> {
    let code = source.split("#[cfg(test)]").next().unwrap_or("");
    let code: String = code
        .lines()
        .map(|l| l.split("//").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n");
    let ident = |s: &str| -> String {
        s.trim_start()
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    };
    let mut out = BTreeSet::new();
    for (i, _) in code.match_indices("crate::") {
        let rest = &code[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // `crate::{a, b::{c, d}, e}`: the first segment of each top-level item.
            let (mut depth, mut item) = (0, String::new());
            for c in group.chars() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        out.insert(ident(&item));
                        item.clear();
                        continue;
                    }
                    _ => {}
                }
                item.push(c);
            }
            out.insert(ident(&item));
        } else {
            out.insert(ident(rest));
        }
    }
    out.retain(|m| !m.is_empty() && m.chars().next().is_some_and(|c| c.is_ascii_lowercase()));
    out
}

/// Top-level module -> the top-level modules it imports, for every module file under src/ (the CLI and the crate
/// roots aside).
fn module_imports() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut stack = vec![src.clone()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let rel = path.strip_prefix(&src).unwrap();
            let top = rel
                .components()
                .next()
                .unwrap()
                .as_os_str()
                .to_string_lossy();
            let top = top.trim_end_matches(".rs").to_string();
            if matches!(top.as_str(), "cli" | "main" | "lib") {
                continue;
            }
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let imports = crate_imports(&std::fs::read_to_string(&path).unwrap());
                out.entry(top.clone())
                    .or_default()
                    .extend(imports.into_iter().filter(|m| *m != top));
            }
        }
    }
    out
}

#[test]
fn each_module_imports_only_its_layer_and_below() {
    let layer: BTreeMap<&str, u8> = LAYERS.iter().copied().collect();
    let imports = module_imports();
    let mut problems = Vec::new();
    for (module, deps) in &imports {
        let Some(&own) = layer.get(module.as_str()) else {
            problems.push(format!(
                "src/{module} has no layer in tests/architecture.rs"
            ));
            continue;
        };
        for dep in deps {
            match layer.get(dep.as_str()) {
                Some(&l) if l <= own => {}
                Some(&l) => {
                    problems.push(format!("{module} (layer {own}) imports {dep} (layer {l})"))
                }
                None => problems.push(format!("{module} imports {dep}, which has no layer")),
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    // The check sees the imports it guards: the runtime imports no FLUX module, the pipeline the engine.
    assert!(imports["pipeline"].contains("engine") && imports["denoise"].contains("engine"));
    assert!(
        imports["runtime"].iter().all(|m| layer[m.as_str()] == 0),
        "{:?}",
        imports["runtime"]
    );
}

#[test]
fn no_two_modules_import_each_other() {
    let imports = module_imports();
    // Depth-first search for a back edge; the path is the loop.
    fn visit<'a>(
        m: &'a str,
        imports: &'a BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<&'a str>,
        done: &mut BTreeSet<&'a str>,
    ) -> Option<Vec<String>> {
        if let Some(i) = path.iter().position(|p| *p == m) {
            return Some(
                path[i..]
                    .iter()
                    .map(|s| s.to_string())
                    .chain([m.to_string()])
                    .collect(),
            );
        }
        if !done.insert(m) {
            return None;
        }
        path.push(m);
        for d in imports.get(m).into_iter().flatten() {
            if let Some(cycle) = visit(d, imports, path, done) {
                return Some(cycle);
            }
        }
        path.pop();
        None
    }
    let mut done = BTreeSet::new();
    for m in imports.keys() {
        let cycle = visit(m, &imports, &mut Vec::new(), &mut done);
        assert!(
            cycle.is_none(),
            "import cycle: {}",
            cycle.unwrap().join(" -> ")
        );
    }
}

#[test]
fn use_trees_are_read_whole() {
    let src =
        "use crate::a::b;\nuse crate::{c, d::{e, f}, g};\n// crate::h\nlet x = crate::i::j();\n\
               #[cfg(test)]\nuse crate::k;";
    let got: Vec<String> = crate_imports(src).into_iter().collect();
    assert_eq!(got, ["a", "c", "d", "g", "i"]);
}
