//! The start-up check of the xAI account: is the key accepted, and does xAI know every
//! configured model id? Asked once by `serve`, so a wrong key or a typo in `models.*` is an
//! error at start instead of an apology to every user.

use serde::Deserialize;

use super::Provider;

/// What the start-up check found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccountCheck {
    /// The key works and every model id is known.
    Ok,
    /// xAI refused the key, or it is blocked or disabled; says which.
    KeyRefused(String),
    /// Configured model ids xAI does not know.
    UnknownModels(Vec<String>),
    /// The answer could not tell (xAI unreachable, a 5xx, an unexpected reply): the service
    /// starts anyway and the first calls will tell.
    Unchecked(String),
}

/// `GET /v1/api-key`: the flags that make a key unusable.
#[derive(Deserialize)]
struct KeyInfo {
    #[serde(default)]
    api_key_blocked: bool,
    #[serde(default)]
    api_key_disabled: bool,
    #[serde(default)]
    team_blocked: bool,
}

impl Provider {
    /// Checks the key (`GET /api-key`) and each distinct model id (`GET /models/{id}`, which
    /// also resolves aliases). Nothing is billed.
    pub async fn check_account(&self, models: &[&str]) -> AccountCheck {
        let Some(key) = &self.api_key else {
            return AccountCheck::KeyRefused("XAI_API_KEY is not set".into());
        };
        match self.get(key, "api-key").await {
            Ok((200, body)) => match serde_json::from_slice::<KeyInfo>(&body) {
                Ok(info) if info.api_key_blocked => {
                    return AccountCheck::KeyRefused("the key is blocked".into())
                }
                Ok(info) if info.api_key_disabled => {
                    return AccountCheck::KeyRefused("the key is disabled".into())
                }
                Ok(info) if info.team_blocked => {
                    return AccountCheck::KeyRefused("the key's team is blocked".into())
                }
                Ok(_) => {}
                Err(e) => return AccountCheck::Unchecked(format!("unreadable /api-key: {e}")),
            },
            // xAI answers a malformed or unknown key with 400, a revoked one with 401/403.
            Ok((status @ (400 | 401 | 403), body)) => {
                let error =
                    super::classify_http_error(status, &String::from_utf8_lossy(&body), None);
                return AccountCheck::KeyRefused(error.to_string());
            }
            Ok((status, _)) => {
                return AccountCheck::Unchecked(format!("/api-key answered {status}"))
            }
            Err(e) => return AccountCheck::Unchecked(e),
        }
        let mut ids: Vec<&str> = models.to_vec();
        ids.sort_unstable();
        ids.dedup();
        let mut unknown = Vec::new();
        for id in ids {
            let segment =
                percent_encoding::utf8_percent_encode(id, percent_encoding::NON_ALPHANUMERIC);
            let path = format!("models/{segment}");
            match self.get(key, &path).await {
                Ok((200, _)) => {}
                Ok((404, _)) => unknown.push(id.to_string()),
                Ok((status, _)) => {
                    return AccountCheck::Unchecked(format!("/models/{id} answered {status}"))
                }
                Err(e) => return AccountCheck::Unchecked(e),
            }
        }
        if unknown.is_empty() {
            AccountCheck::Ok
        } else {
            AccountCheck::UnknownModels(unknown)
        }
    }

    /// One authenticated GET: the status and body, or why there was none.
    async fn get(&self, key: &str, path: &str) -> Result<(u16, Vec<u8>), String> {
        let response = self
            .http
            .get(format!("{}/{path}", self.base_url))
            .bearer_auth(key)
            .timeout(std::time::Duration::from_secs(15))
            .send()
            .await
            .map_err(|e| format!("xAI unreachable: {}", super::transport_message(e)))?;
        let status = response.status().as_u16();
        let body = response
            .bytes()
            .await
            .map_err(|e| format!("xAI answer unreadable: {}", super::transport_message(e)))?;
        Ok((status, body.to_vec()))
    }
}
