//! The documentation holds together: every relative link of the README, `docs/` and the
//! other READMEs resolves (the file exists; an anchor names a heading of it), every page
//! of `docs/` is reachable from the README, and the README stays short.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// The Markdown files whose links are checked.
fn pages(root: &Path) -> Vec<PathBuf> {
    let mut out = vec![root.join("README.md"), root.join("infra/README.md")];
    let mut docs: Vec<PathBuf> = std::fs::read_dir(root.join("docs"))
        .expect("docs/ exists")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "md"))
        .collect();
    docs.sort();
    out.extend(docs);
    out.push(root.join("tests/fixtures/golden/README.md"));
    out.retain(|p| p.exists());
    out
}

/// `(text, target)` of every inline link outside code fences and code spans.
fn links(markdown: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut fenced = false;
    for line in markdown.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if fenced {
            continue;
        }
        // Drop code spans: a `](` inside backticks is not a link.
        let mut plain = String::new();
        for (i, part) in line.split('`').enumerate() {
            if i % 2 == 0 {
                plain.push_str(part);
            }
        }
        let mut rest = plain.as_str();
        while let Some(at) = rest.find("](") {
            let after = &rest[at + 2..];
            let Some(end) = after.find(')') else { break };
            out.push(after[..end].to_string());
            rest = &after[end..];
        }
    }
    out
}

/// GitHub's anchor of a heading: lower case, punctuation dropped, spaces to dashes.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || *c == ' ' || *c == '-' || *c == '_')
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

fn anchors(markdown: &str) -> BTreeSet<String> {
    let mut fenced = false;
    let mut out = BTreeSet::new();
    for line in markdown.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
        } else if !fenced && line.starts_with('#') {
            out.insert(slug(line.trim_start_matches('#')));
        }
    }
    out
}

fn broken_links(root: &Path) -> Vec<String> {
    let mut broken = Vec::new();
    for page in pages(root) {
        let text = std::fs::read_to_string(&page).unwrap();
        let dir = page.parent().unwrap();
        for target in links(&text) {
            if target.contains("://") || target.starts_with("mailto:") {
                continue;
            }
            let (file, anchor) = match target.split_once('#') {
                Some((f, a)) => (f, Some(a)),
                None => (target.as_str(), None),
            };
            let path = if file.is_empty() {
                page.clone()
            } else {
                dir.join(file)
            };
            let shown = format!("{}: ({target})", page.strip_prefix(root).unwrap().display());
            if !path.exists() {
                broken.push(format!("{shown}: {} does not exist", path.display()));
                continue;
            }
            if let Some(a) = anchor {
                let md = std::fs::read_to_string(&path).unwrap_or_default();
                if !anchors(&md).contains(a) {
                    broken.push(format!("{shown}: no heading #{a} in {}", path.display()));
                }
            }
        }
    }
    broken
}

#[test]
fn every_relative_link_of_the_docs_resolves() {
    let root = pilotlight_tests::repo_root();
    let broken = broken_links(&root);
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}

#[test]
fn the_link_check_finds_a_broken_link_and_a_missing_anchor() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(tmp.path().join("docs")).unwrap();
    std::fs::write(
        tmp.path().join("README.md"),
        "# Top\n\n[ok](docs/a.md) [gone](docs/missing.md) [anchor](docs/a.md#no-such) `[code](x.md)`\n",
    )
    .unwrap();
    std::fs::write(
        tmp.path().join("docs/a.md"),
        "# A page\n\n[up](../README.md#top)\n",
    )
    .unwrap();
    let broken = broken_links(tmp.path());
    assert_eq!(broken.len(), 2, "{broken:?}");
    assert!(broken[0].contains("missing.md"), "{broken:?}");
    assert!(broken[1].contains("#no-such"), "{broken:?}");
}

#[test]
fn every_docs_page_is_linked_from_the_readme_and_the_readme_stays_short() {
    let root = pilotlight_tests::repo_root();
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let lines = readme.lines().count();
    assert!(
        lines <= 300,
        "README.md has {lines} lines: keep it to what a newcomer reads in five minutes and move the rest to docs/"
    );
    let linked: BTreeSet<String> = links(&readme).into_iter().collect();
    for page in pages(&root) {
        let rel = page.strip_prefix(&root).unwrap().display().to_string();
        if rel.starts_with("docs/") {
            assert!(
                linked
                    .iter()
                    .any(|l| l.split('#').next() == Some(rel.as_str())),
                "{rel} is not linked from the README"
            );
        }
    }
}
