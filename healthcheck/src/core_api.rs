//! Defguard Core's REST API as the sidecar uses it: `Authorization: Bearer` with an API token,
//! JSON both ways, and a 401 that says what Core needs.

use std::time::Duration;

use anyhow::Context;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::config::Core;

pub struct CoreApi {
    client: reqwest::Client,
    core: Core,
}

impl CoreApi {
    pub fn new(core: Core) -> anyhow::Result<CoreApi> {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .context("building the HTTP client for Core")?;
        Ok(CoreApi { client, core })
    }

    pub fn core(&self) -> &Core {
        &self.core
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.core.url.trim_end_matches('/'))
    }

    /// `GET path`, its JSON answer decoded.
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        let url = self.url(path);
        let response = self
            .client
            .get(&url)
            .bearer_auth(&self.core.token)
            .send()
            .await
            .with_context(|| format!("GET {url}"))?;
        let response = refused(response, "GET", &url)?;
        response
            .json()
            .await
            .with_context(|| format!("GET {url}: not the JSON Core serves"))
    }

    /// `POST path` with `body` as JSON; Ok when Core took it.
    pub async fn post<B: Serialize>(&self, path: &str, body: &B) -> anyhow::Result<()> {
        let url = self.url(path);
        let response = self
            .client
            .post(&url)
            .bearer_auth(&self.core.token)
            .json(body)
            .send()
            .await
            .with_context(|| format!("POST {url}"))?;
        let response = refused(response, "POST", &url)?;
        let _ = response.bytes().await;
        Ok(())
    }
}

/// The response if Core took the request; else what went wrong, and for a 401 what Core needs.
fn refused(
    response: reqwest::Response,
    method: &str,
    url: &str,
) -> anyhow::Result<reqwest::Response> {
    let status = response.status();
    anyhow::ensure!(
        status != reqwest::StatusCode::UNAUTHORIZED,
        "{method} {url}: {status}: Core refused the API token; its REST API takes the token of an admin user, and only while a Business licence (or higher) is active"
    );
    anyhow::ensure!(status.is_success(), "{method} {url}: {status}");
    Ok(response)
}
