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
/// the start of its labels. `None` when no sample matches: a series that does not exist (yet:
/// labelled series appear with their first event) is not a zero.
pub fn sum(text: &str, prefix: &str) -> Option<f64> {
    text.lines()
        .filter(|line| line.starts_with(prefix))
        .filter_map(sample_value)
        .fold(None, |total, value| Some(total.unwrap_or(0.0) + value))
}

/// [`sum`] for a reader that needs the series: its absence is an error.
pub fn value(text: &str, prefix: &str) -> Result<f64> {
    sum(text, prefix).with_context(|| format!("no series {prefix}"))
}

/// [`sum`] for a counter that may never have been created because nothing happened to it yet
/// (a labelled counter appears with its first increment): absent is zero. Only for that.
pub fn value_or_zero(text: &str, prefix: &str) -> f64 {
    sum(text, prefix).unwrap_or(0.0)
}

/// Polls `scrape` until the series `prefix` exists and `done` accepts its value, and returns it.
/// An absent series is waited for like a wrong value, but the timeout says which it was; a
/// failed scrape ends the wait.
pub fn wait_for_value(
    prefix: &str,
    timeout: Duration,
    mut scrape: impl FnMut() -> Result<String>,
    done: impl Fn(f64) -> bool,
) -> Result<f64> {
    let mut last = None;
    crate::wait_for(prefix, timeout, || {
        let value = sum(&scrape()?, prefix);
        last = Some(value);
        Ok(value.filter(|v| done(*v)))
    })
    .with_context(|| match last {
        Some(Some(value)) => format!("{prefix} is {value}"),
        Some(None) => format!("{prefix} is absent"),
        None => format!("{prefix} was never read"),
    })
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
        assert_eq!(sum(text, "wglb_sessions{"), Some(5.0));
        assert_eq!(sum(text, "wglb_sessions{gateway=\"b\""), Some(3.0));
        assert_eq!(sum(text, "wglb_nothing"), None);
        let zero = "wglb_dropped_total{reason=\"junk\"} 0\n";
        assert_eq!(sum(zero, "wglb_dropped_total"), Some(0.0));
        assert_eq!(value_or_zero(text, "wglb_nothing"), 0.0);
        let absent = value(text, "wglb_nothing").unwrap_err().to_string();
        assert_eq!(absent, "no series wglb_nothing");
    }

    #[test]
    fn waits_tell_an_absent_series_from_a_wrong_value() {
        let quick = Duration::from_millis(50);
        let text = "wglb_sessions 3\n";
        let scrape = || Ok(text.to_string());
        assert_eq!(
            wait_for_value("wglb_sessions", quick, scrape, |v| v == 3.0).unwrap(),
            3.0
        );
        let wrong = wait_for_value("wglb_sessions", quick, scrape, |v| v == 0.0).unwrap_err();
        assert!(
            format!("{wrong:#}").starts_with("wglb_sessions is 3: timed out"),
            "{wrong:#}"
        );
        // Waiting for zero on a series that is not there does not pass: it times out as absent.
        let absent = wait_for_value("wglb_nothing", quick, scrape, |v| v == 0.0).unwrap_err();
        assert!(
            format!("{absent:#}").starts_with("wglb_nothing is absent: timed out"),
            "{absent:#}"
        );
        let failed = wait_for_value(
            "wglb_sessions",
            quick,
            || anyhow::bail!("refused"),
            |_| true,
        );
        assert!(format!("{:#}", failed.unwrap_err()).contains("refused"));
    }
}
