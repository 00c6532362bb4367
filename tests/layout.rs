//! The module graph, checked from the sources: every top-level module of the library imports
//! only modules below it in [`LAYERS`], so there is no import cycle and the direction of every
//! dependency is the one the crate docs describe. Test code (`#[cfg(test)]` items and the
//! `tests.rs` files they load) may reach up (e.g. to the emulator to mint tokens); production
//! code may not.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

use syn::visit::Visit;

/// Bottom first. A module may import modules listed before it, never after.
const LAYERS: &[&str] = &[
    "secret",
    "retry",
    "pb",
    "error",
    "canonical",
    "token",
    "authz",
    "clerk",
    "verify",
    "credentials",
    "layer",
    "emulator",
    "server",
];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

fn is_cfg_test(attrs: &[syn::Attribute]) -> bool {
    attrs.iter().any(|a| {
        a.path().is_ident("cfg")
            && a.parse_args::<syn::Meta>()
                .is_ok_and(|m| m.path().is_ident("test"))
    })
}

#[derive(Default)]
struct Uses(BTreeSet<String>);

impl Uses {
    fn tree(&mut self, t: &syn::UseTree, at_crate: bool) {
        match t {
            syn::UseTree::Path(p) if !at_crate && p.ident == "crate" => {
                self.tree(&p.tree, true);
            }
            syn::UseTree::Path(_) if !at_crate => {}
            syn::UseTree::Path(p) => {
                self.0.insert(p.ident.to_string());
            }
            syn::UseTree::Name(n) if at_crate => {
                self.0.insert(n.ident.to_string());
            }
            syn::UseTree::Rename(r) if at_crate => {
                self.0.insert(r.ident.to_string());
            }
            syn::UseTree::Group(g) => {
                for t in &g.items {
                    self.tree(t, at_crate);
                }
            }
            _ => {}
        }
    }
}

impl<'a> Visit<'a> for Uses {
    fn visit_item(&mut self, i: &'a syn::Item) {
        let attrs = match i {
            syn::Item::Mod(m) => &m.attrs,
            syn::Item::Fn(f) => &f.attrs,
            syn::Item::Impl(x) => &x.attrs,
            syn::Item::Use(u) => &u.attrs,
            syn::Item::Struct(s) => &s.attrs,
            syn::Item::Const(c) => &c.attrs,
            syn::Item::Static(s) => &s.attrs,
            _ => return syn::visit::visit_item(self, i),
        };
        if !is_cfg_test(attrs) {
            syn::visit::visit_item(self, i);
        }
    }
    fn visit_item_use(&mut self, u: &'a syn::ItemUse) {
        self.tree(&u.tree, false);
    }
    fn visit_path(&mut self, p: &'a syn::Path) {
        let mut s = p.segments.iter();
        if s.next().is_some_and(|f| f.ident == "crate") {
            if let Some(second) = s.next() {
                self.0.insert(second.ident.to_string());
            }
        }
        syn::visit::visit_path(self, p);
    }
    fn visit_macro(&mut self, m: &'a syn::Macro) {
        // Paths inside macro bodies (`format!`, `matches!`, …) are tokens, not syntax: read
        // `crate :: name` sequences from them too.
        let toks: Vec<String> = m
            .tokens
            .clone()
            .into_iter()
            .map(|t| t.to_string())
            .collect();
        for w in toks.windows(4) {
            if w[0] == "crate" && w[1] == ":" && w[2] == ":" {
                self.0.insert(w[3].clone());
            }
        }
        syn::visit::visit_macro(self, m);
    }
}

/// Top-level module → the top-level modules its production code names.
fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in files {
        let rel = f.strip_prefix(&src).unwrap();
        let first = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy();
        let top = first.trim_end_matches(".rs").to_owned();
        // The binary (main.rs, cmd/) is a separate crate; `tests.rs` files are test modules.
        if top == "main" || top == "cmd" || f.file_name().unwrap() == "tests.rs" {
            continue;
        }
        let text = std::fs::read_to_string(&f).unwrap();
        let file = syn::parse_file(&text).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        let mut uses = Uses::default();
        uses.visit_file(&file);
        let deps = g.entry(top.clone()).or_default();
        for u in uses.0 {
            if u != top && LAYERS.contains(&u.as_str()) {
                deps.insert(u);
            }
        }
    }
    g
}

#[test]
fn every_top_level_module_is_placed_in_the_layers() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let lib = std::fs::read_to_string(src.join("lib.rs")).unwrap();
    let file = syn::parse_file(&lib).unwrap();
    let declared: BTreeSet<String> = file
        .items
        .iter()
        .filter_map(|i| match i {
            syn::Item::Mod(m) if !is_cfg_test(&m.attrs) && m.ident != "fuzzing" => {
                Some(m.ident.to_string())
            }
            _ => None,
        })
        .collect();
    let layered: BTreeSet<String> = LAYERS.iter().map(|s| s.to_string()).collect();
    assert_eq!(declared, layered, "src/lib.rs's modules and LAYERS differ");
}

#[test]
fn dependencies_point_down_and_form_no_cycle() {
    let g = graph();
    let rank = |m: &str| LAYERS.iter().position(|l| *l == m);
    let mut upward = Vec::new();
    for (from, deps) in &g {
        let Some(r) = rank(from) else { continue };
        for to in deps {
            if rank(to).is_some_and(|t| t >= r) {
                upward.push(format!("{from} -> {to}"));
            }
        }
    }
    let shown: Vec<String> = g
        .iter()
        .map(|(k, v)| {
            format!(
                "{k} -> {}",
                v.iter().cloned().collect::<Vec<_>>().join(", ")
            )
        })
        .collect();
    assert!(
        upward.is_empty(),
        "imports that point up the layers (a cycle, or a misplaced module): {upward:?}\n\
         graph:\n{}",
        shown.join("\n")
    );
    // The graph seen is real: the layer does import the verifier, the server the layer.
    assert!(g["layer"].contains("verify"), "{shown:?}");
    assert!(g["server"].contains("layer"), "{shown:?}");
}
