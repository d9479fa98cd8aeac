//! The demo, as the README's first command runs it: both failovers narrated, every client
//! accounted for, and its picture a valid SVG with every client's row and both kills. Needs
//! root, and `wglb` and `wglb-agent` next to `wglb-lab` (`cargo test --workspace` builds them).

use std::path::Path;
use std::process::Command;

use anyhow::{ensure, Context, Result};
use wglb_lab::require_root;

#[test]
fn the_demo_narrates_both_failovers_and_draws_them() -> Result<()> {
    require_root()?;
    let lab = Path::new(env!("CARGO_BIN_EXE_wglb-lab"));
    let (wglb, agent) = (lab.with_file_name("wglb"), lab.with_file_name("wglb-agent"));
    for program in [&wglb, &agent] {
        ensure!(
            program.exists(),
            "no {} (cargo build --workspace)",
            program.display()
        );
    }
    let svg = std::env::temp_dir().join(format!("wglb-demo-{}.svg", std::process::id()));
    let output = Command::new(lab)
        .arg("demo")
        .arg("--wglb")
        .arg(&wglb)
        .arg("--agent")
        .arg(&agent)
        .arg("--svg")
        .arg(&svg)
        .output()
        .context("running the demo")?;
    let said = String::from_utf8_lossy(&output.stdout).into_owned();
    ensure!(
        output.status.success(),
        "{said}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    // Two gateways stopped; every client of each answered again, the others lost nothing.
    let stopped: Vec<&str> = said
        .lines()
        .filter(|l| l.contains("] stopped gw"))
        .collect();
    ensure!(stopped.len() == 2, "{said}");
    let answered = said
        .lines()
        .filter(|l| l.contains("answered again"))
        .count();
    let untouched = said.lines().filter(|l| l.contains("no ping lost")).count();
    ensure!(answered + untouched == 12, "six clients, twice:\n{said}");
    ensure!(answered >= 2, "{said}");
    ensure!(said.contains(&svg.display().to_string()), "{said}");

    let text = std::fs::read_to_string(&svg)?;
    std::fs::remove_file(&svg)?;
    let document = roxmltree::Document::parse(&text).context("the picture is not XML")?;
    ensure!(document.root_element().has_tag_name("svg"));
    let texts: Vec<&str> = document
        .descendants()
        .filter(|n| n.has_tag_name("text"))
        .filter_map(|n| n.text())
        .map(str::trim)
        .collect();
    for i in 0..6 {
        ensure!(texts.contains(&format!("client {i}").as_str()), "{texts:?}");
    }
    ensure!(
        texts.iter().any(|t| t.contains("killed, no agents")),
        "{texts:?}"
    );
    ensure!(
        texts.iter().any(|t| t.contains("killed, with agents")),
        "{texts:?}"
    );
    Ok(())
}
