//! Reading a balancer's Prometheus metrics, as the tests, benchmarks and the demo do.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::{ensure, Context, Result};

/// The body of `GET /metrics` at `address` (plain HTTP/1.0). From another namespace, call it
/// inside [`crate::Netns::run`].
pub fn scrape(address: SocketAddr) -> Result<String> {
    let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(2))
        .with_context(|| format!("connecting to {address}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(stream, "GET /metrics HTTP/1.0\r\nHost: {address}\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .context("malformed HTTP response")?;
    let status = head.lines().next().unwrap_or_default();
    ensure!(
        status.contains(" 200"),
        "metrics endpoint answered {status:?}"
    );
    Ok(body.to_owned())
}

/// Checks an exposition with Prometheus' own parser and linter (`promtool check metrics`, from
/// Debian's prometheus package): syntax, types, and naming conventions such as `_total` counters.
pub fn check_exposition(text: &str) -> Result<()> {
    crate::cmd::run_with_input(
        std::process::Command::new("promtool").args(["check", "metrics"]),
        text.as_bytes(),
    )
    .context("promtool (from Debian's prometheus package, which scripts/setup.sh installs)")?;
    Ok(())
}

/// The sample value of a text-format line; label values may contain spaces, so look after the
/// closing brace.
pub fn sample_value(line: &str) -> Option<f64> {
    let rest = match line.rfind('}') {
        Some(brace) => &line[brace + 1..],
        None => line.split_once(' ')?.1,
    };
    rest.split_whitespace().next()?.parse().ok()
}

/// The sum of every sample whose series starts with `prefix`: a metric name, or a name with
/// the start of its labels.
pub fn sum(text: &str, prefix: &str) -> f64 {
    text.lines()
        .filter(|line| line.starts_with(prefix))
        .filter_map(sample_value)
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_sample_values() {
        assert_eq!(sample_value("wglb_sessions 3"), Some(3.0));
        assert_eq!(
            sample_value(r#"wglb_bytes_total{gateway="gw 0",listener="demo"} 11320 1700000000"#),
            Some(11320.0)
        );
        assert_eq!(sample_value("wglb_broken"), None);
    }

    #[test]
    fn sums_by_prefix() {
        let text = "# HELP wglb_sessions x\nwglb_sessions{gateway=\"a\"} 2\nwglb_sessions{gateway=\"b\"} 3\nwglb_sessions_created_total 9\n";
        assert_eq!(sum(text, "wglb_sessions{"), 5.0);
        assert_eq!(sum(text, "wglb_sessions{gateway=\"b\""), 3.0);
        assert_eq!(sum(text, "wglb_nothing"), 0.0);
    }
}
