//! Any S3-compatible endpoint through the real aws-sdk-s3 client.

use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_s3::Client;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{
    Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use bytes::Bytes;

use super::{CACHE_CONTROL, ListedObject, ObjectPage, ObjectStore, StoreError, join_url};
use crate::config::S3Settings;
use crate::model::Cause;

pub struct S3Store {
    client: Client,
    bucket: String,
    prefix: String,
    base_url: String,
}

impl S3Store {
    pub async fn open(settings: &S3Settings) -> Result<Self, StoreError> {
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .region(Region::new(settings.region.clone()));
        match (&settings.access_key_id, &settings.secret_access_key) {
            (Some(id), Some(secret)) => {
                loader = loader.credentials_provider(Credentials::new(
                    id.expose(),
                    secret.expose(),
                    None,
                    None,
                    "avatar-warden-config",
                ));
            }
            (None, None) => {} // the standard AWS chain
            _ => {
                return Err(StoreError::Config(
                    "set both storage.access_key_id and storage.secret_access_key, or neither"
                        .into(),
                ));
            }
        }
        let sdk = loader.load().await;
        let timeout = Duration::from_secs(settings.timeout_secs.max(1));
        let mut config = aws_sdk_s3::config::Builder::from(&sdk)
            .force_path_style(settings.force_path_style)
            // S3-compatible servers (Garage, older MinIO, Ceph) reject the SDK's
            // default extra CRC checksums: send and verify them only when required.
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(5).min(timeout))
                    .operation_attempt_timeout(timeout)
                    .operation_timeout(timeout * 3)
                    .build(),
            );
        if let Some(endpoint) = &settings.endpoint {
            config = config.endpoint_url(endpoint.expose());
        }
        let base_url = match (&settings.public_base_url, &settings.endpoint) {
            (Some(base), _) => base.clone(),
            (None, Some(endpoint)) if settings.force_path_style => {
                join_url(endpoint.expose(), &settings.bucket)
            }
            (None, Some(endpoint)) => {
                let ep = url::Url::parse(endpoint.expose()).map_err(|e| {
                    StoreError::Config(format!("storage.endpoint {endpoint:?}: {e}"))
                })?;
                format!(
                    "{}://{}.{}",
                    ep.scheme(),
                    settings.bucket,
                    ep.host_str().unwrap_or_default()
                ) + &ep.port().map(|p| format!(":{p}")).unwrap_or_default()
            }
            (None, None) => format!(
                "https://{}.s3.{}.amazonaws.com",
                settings.bucket, settings.region
            ),
        };
        Ok(S3Store {
            client: Client::from_conf(config.build()),
            bucket: settings.bucket.clone(),
            prefix: settings.prefix.clone(),
            base_url,
        })
    }

    pub fn client(&self) -> &Client {
        &self.client
    }
}

fn map_sdk_error<E>(err: SdkError<E>) -> StoreError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    match &err {
        SdkError::TimeoutError(_) => StoreError::Timeout,
        SdkError::DispatchFailure(f) if f.is_timeout() => StoreError::Timeout,
        SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => {
            StoreError::Request(Cause::new(err))
        }
        SdkError::ServiceError(service) => {
            let status = service.raw().status().as_u16();
            let message = format!(
                "HTTP {status} {}: {}",
                service.err().code().unwrap_or("unknown"),
                service.err().message().unwrap_or("")
            );
            if status >= 500 || status == 429 {
                StoreError::Unavailable(message)
            } else {
                StoreError::Rejected(message)
            }
        }
        _ => StoreError::Request(Cause::new(err)),
    }
}

#[async_trait]
impl ObjectStore for S3Store {
    async fn exists(&self, key: &str) -> Result<bool, StoreError> {
        match self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
        {
            Ok(_) => Ok(true),
            Err(SdkError::ServiceError(e)) if e.err().is_not_found() => Ok(false),
            // HEAD has no body, so some servers' 404 arrives without the NotFound code.
            Err(SdkError::ServiceError(e)) if e.raw().status().as_u16() == 404 => Ok(false),
            Err(e) => Err(map_sdk_error(e)),
        }
    }

    async fn put(&self, key: &str, body: Bytes, content_type: &str) -> Result<(), StoreError> {
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .content_type(content_type)
            .cache_control(CACHE_CONTROL)
            .body(ByteStream::from(body))
            .send()
            .await
            .map_err(map_sdk_error)?;
        Ok(())
    }

    fn public_url(&self, key: &str) -> String {
        join_url(&self.base_url, key)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.client
            .head_bucket()
            .bucket(&self.bucket)
            .send()
            .await
            .map_err(map_sdk_error)?;
        Ok(())
    }

    fn prefix(&self) -> &str {
        &self.prefix
    }

    async fn list_avatars(&self, cursor: Option<String>) -> Result<ObjectPage, StoreError> {
        let page = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(format!("{}avatars/", self.prefix))
            .set_continuation_token(cursor)
            .max_keys(1000)
            .send()
            .await
            .map_err(map_sdk_error)?;
        let objects = page
            .contents()
            .iter()
            .filter_map(|o| {
                Some(ListedObject {
                    key: o.key()?.to_string(),
                    size: u64::try_from(o.size().unwrap_or(0)).unwrap_or(0),
                    modified: o
                        .last_modified()
                        .map_or(0, aws_sdk_s3::primitives::DateTime::secs),
                })
            })
            .collect();
        let next = page
            .is_truncated()
            .unwrap_or(false)
            .then(|| page.next_continuation_token().map(str::to_owned))
            .flatten();
        Ok(ObjectPage { objects, next })
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.client
            .delete_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
            .map_err(map_sdk_error)?;
        Ok(())
    }
}
