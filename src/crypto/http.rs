//! The crypto machine's HTTP: ruma-typed client-server requests sent as the bot's device
//! (`?user_id=&device_id=`, MSC4326 device masquerading), and the machine's outgoing requests
//! (key uploads and queries, Olm session claims, to-device messages, signatures) executed
//! and acknowledged.

use std::borrow::Cow;
use std::collections::BTreeSet;
use std::time::Duration;

use matrix_sdk_crypto::types::requests::{
    AnyOutgoingRequest, OutgoingRequest, ToDeviceRequest, UploadSigningKeysRequest,
};
use matrix_sdk_crypto::OlmMachine;
use ruma::api::auth_scheme::SendAccessToken;
use ruma::api::client::keys::{get_keys, upload_signing_keys};
use ruma::api::client::message::send_message_event;
use ruma::api::client::to_device::send_event_to_device;
use ruma::api::path_builder::VersionHistory;
use ruma::api::{
    AppserviceUserIdentity, IncomingResponse, MatrixVersion, OutgoingRequestAppserviceExt,
    SupportedVersions,
};
use ruma::serde::Raw;
use ruma::{OwnedDeviceId, OwnedUserId, TransactionId};

use super::CryptoError;

/// The client-server API as the bot's one device.
#[derive(Clone)]
pub struct DeviceHttp {
    http: reqwest::Client,
    base_url: String,
    as_token: String,
    pub user_id: OwnedUserId,
    pub device_id: OwnedDeviceId,
    versions: SupportedVersions,
    /// One flush at a time (the sync loop's and a send's): two would each send the machine's
    /// queued requests, twice.
    flushing: std::sync::Arc<tokio::sync::Mutex<()>>,
}

impl DeviceHttp {
    /// A client for `base_url` acting as `user_id`'s device `device_id` with the `as_token`.
    pub fn new(
        base_url: &str,
        as_token: &str,
        user_id: OwnedUserId,
        device_id: OwnedDeviceId,
    ) -> Self {
        let http = reqwest::Client::builder()
            // Long enough for a /sync long-poll (30 s) and its answer.
            .timeout(Duration::from_secs(60))
            .connect_timeout(Duration::from_secs(10))
            .build()
            .expect("the TLS backend initialises");
        Self {
            http,
            base_url: base_url.trim_end_matches('/').to_string(),
            as_token: as_token.to_string(),
            user_id,
            device_id,
            // The stable paths: every endpoint used here has one since v1.1.
            versions: SupportedVersions {
                versions: BTreeSet::from([MatrixVersion::V1_1]),
                features: BTreeSet::new(),
            },
            flushing: Default::default(),
        }
    }

    /// Sends one request as the device and reads its typed response.
    pub async fn send<R>(&self, request: R) -> Result<R::IncomingResponse, CryptoError>
    where
        R: OutgoingRequestAppserviceExt<PathBuilder = VersionHistory>,
        for<'a> R::Authentication:
            ruma::api::auth_scheme::AuthScheme<Input<'a> = SendAccessToken<'a>>,
    {
        let mut identity = AppserviceUserIdentity::new(&self.user_id);
        identity.device_id = Some(&self.device_id);
        let http_request = request
            .try_into_http_request_with_identity::<Vec<u8>>(
                &self.base_url,
                SendAccessToken::Appservice(&self.as_token),
                identity,
                Cow::Borrowed(&self.versions),
            )
            .map_err(|e| CryptoError::Request(e.to_string()))?;
        let request = reqwest::Request::try_from(http_request)
            .map_err(|e| CryptoError::Request(e.without_url().to_string()))?;
        let response = self
            .http
            .execute(request)
            .await
            .map_err(|e| CryptoError::Transport(e.without_url().to_string()))?;
        let status = response.status();
        let body = response
            .bytes()
            .await
            .map_err(|e| CryptoError::Transport(e.without_url().to_string()))?;
        let http_response = http::Response::builder()
            .status(status)
            .body(body.to_vec())
            .map_err(|e| CryptoError::Request(e.to_string()))?;
        R::IncomingResponse::try_from_http_response(http_response).map_err(|e| {
            // The homeserver's error body names what it refused; it holds no key material.
            CryptoError::Homeserver {
                status: status.as_u16(),
                errcode: errcode_of(&body),
                message: e.to_string(),
            }
        })
    }

    /// Sends every request the machine has queued and hands it each response. A failed
    /// request does not hold back the ones after it (it stays queued for the next flush):
    /// one the homeserver keeps refusing must not block every key query and key share; the
    /// first error is returned once all were tried.
    pub async fn flush(&self, machine: &OlmMachine) -> Result<(), CryptoError> {
        let _one_at_a_time = self.flushing.lock().await;
        let mut first_error = None;
        for request in machine.outgoing_requests().await? {
            if let Err(e) = self.execute(machine, &request).await {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Executes one of the machine's outgoing requests and marks it sent.
    pub async fn execute(
        &self,
        machine: &OlmMachine,
        request: &OutgoingRequest,
    ) -> Result<(), CryptoError> {
        let id = request.request_id();
        match request.request() {
            AnyOutgoingRequest::KeysUpload(r) => {
                let response = self.send(r.clone()).await?;
                machine.mark_request_as_sent(id, &response).await?;
            }
            AnyOutgoingRequest::KeysQuery(r) => {
                let mut query = get_keys::v3::Request::new();
                query.device_keys = r.device_keys.clone();
                query.timeout = r.timeout;
                let response = self.send(query).await?;
                machine.mark_request_as_sent(id, &response).await?;
            }
            AnyOutgoingRequest::KeysClaim(r) => {
                let response = self.send(r.clone()).await?;
                machine.mark_request_as_sent(id, &response).await?;
            }
            AnyOutgoingRequest::ToDeviceRequest(r) => self.to_device(machine, id, r).await?,
            AnyOutgoingRequest::SignatureUpload(r) => {
                let response = self.send(r.clone()).await?;
                machine.mark_request_as_sent(id, &response).await?;
            }
            AnyOutgoingRequest::RoomMessage(r) => {
                let message = send_message_event::v3::Request::new(
                    r.room_id.clone(),
                    r.txn_id.clone(),
                    &*r.content,
                )
                .map_err(|e| CryptoError::Request(e.to_string()))?;
                let response = self.send(message).await?;
                machine.mark_request_as_sent(id, &response).await?;
            }
        }
        Ok(())
    }

    /// Sends a to-device request (room keys, Olm messages) and marks it sent.
    pub async fn to_device(
        &self,
        machine: &OlmMachine,
        id: &TransactionId,
        request: &ToDeviceRequest,
    ) -> Result<(), CryptoError> {
        let send = send_event_to_device::v3::Request::new_raw(
            request.event_type.clone(),
            request.txn_id.clone(),
            request.messages.clone(),
        );
        let response = self.send(send).await?;
        machine.mark_request_as_sent(id, &response).await?;
        Ok(())
    }

    /// Uploads the public cross-signing keys. The homeserver asks an appservice for no
    /// interactive auth (MSC4190).
    pub async fn upload_signing_keys(
        &self,
        request: UploadSigningKeysRequest,
    ) -> Result<(), CryptoError> {
        let raw = |key: Option<matrix_sdk_crypto::types::CrossSigningKey>| {
            key.map(|k| Raw::new(&k).map(Raw::cast_unchecked))
                .transpose()
        };
        let mut upload = upload_signing_keys::v3::Request::new();
        upload.master_key = raw(request.master_key)?;
        upload.self_signing_key = raw(request.self_signing_key)?;
        upload.user_signing_key = raw(request.user_signing_key)?;
        self.send(upload).await?;
        Ok(())
    }
}

/// The `errcode` of a Matrix error body, if it is one.
fn errcode_of(body: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct MatrixErrorBody {
        errcode: String,
    }
    serde_json::from_slice::<MatrixErrorBody>(body)
        .ok()
        .map(|b| b.errcode)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_errcode_is_read_from_matrix_errors_only() {
        assert_eq!(
            errcode_of(br#"{"errcode":"M_UNKNOWN_DEVICE","error":"gone"}"#).as_deref(),
            Some("M_UNKNOWN_DEVICE")
        );
        assert_eq!(errcode_of(b"<html>502</html>"), None);
        assert_eq!(errcode_of(br#"{"error":"no code"}"#), None);
        let gone = CryptoError::Homeserver {
            status: 400,
            errcode: errcode_of(br#"{"errcode":"M_UNKNOWN_DEVICE","error":"gone"}"#),
            message: String::new(),
        };
        assert!(gone.device_gone());
        let other = CryptoError::Homeserver {
            status: 400,
            errcode: Some("M_FORBIDDEN".into()),
            message: String::new(),
        };
        assert!(!other.device_gone());
    }
}
