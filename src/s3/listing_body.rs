//! s3::listing_body: keeps the SDK from parsing a `ListObjectVersions` page that the project
//! parses itself. The SDK would build a full output (every version and delete marker, its
//! strings and dates) that the project throws away: `s3::xml::parse_page` reads the raw body,
//! because only it has the interleaving of versions and delete markers. Measured: the SDK's
//! XML decoding was ~40% of `plan`'s CPU.
//!
//! [`TakeListing`] is an interceptor for the listing request: before deserialization it wraps
//! a successful response's body so that, once read, the real body goes to the caller's slot
//! and the SDK sees an empty `ListVersionsResult` instead of a page. A body whose root element is anything else
//! (an `<Error>` sent with status 200) reaches the SDK unchanged, and so does every error
//! status: the SDK classifies errors as before.
//!
//! May call: the AWS SDK's interceptor and body types; nothing of the crate.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};

use aws_smithy_runtime_api::box_error::BoxError;
use aws_smithy_runtime_api::client::interceptors::context::BeforeDeserializationInterceptorContextMut;
use aws_smithy_runtime_api::client::interceptors::Intercept;
use aws_smithy_runtime_api::client::runtime_components::RuntimeComponents;
use aws_smithy_types::body::SdkBody;
use aws_smithy_types::config_bag::ConfigBag;
use bytes::Bytes;
use http_body::{Body, Frame};

/// The root element of a listing page.
const ROOT: &str = "ListVersionsResult";

/// What the SDK parses instead of the page.
const EMPTY_PAGE: &str =
    r#"<ListVersionsResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/"></ListVersionsResult>"#;

/// The interceptor; [`TakeListing::take`] returns the page body once the request is done.
#[derive(Clone, Debug, Default)]
pub(super) struct TakeListing(Arc<Mutex<Option<Bytes>>>);

impl TakeListing {
    /// The listing body, if a successful listing response was read.
    pub(super) fn take(&self) -> Option<Bytes> {
        self.0.lock().expect("listing body lock").take()
    }
}

impl Intercept for TakeListing {
    fn name(&self) -> &'static str {
        "TakeListing"
    }

    fn modify_before_deserialization(
        &self,
        context: &mut BeforeDeserializationInterceptorContextMut<'_>,
        _rc: &RuntimeComponents,
        _cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let response = context.response_mut();
        if !response.status().is_success() {
            return Ok(());
        }
        let body = std::mem::replace(response.body_mut(), SdkBody::taken());
        *response.body_mut() = SdkBody::from_body_1_x(Swap {
            inner: Box::pin(body),
            read: Vec::new(),
            slot: self.clone(),
            done: false,
        });
        Ok(())
    }
}

/// A response body read whole, kept in the slot, and handed on to the SDK: as [`EMPTY_PAGE`]
/// when it is a listing page, else unchanged.
struct Swap {
    inner: Pin<Box<SdkBody>>,
    read: Vec<u8>,
    slot: TakeListing,
    done: bool,
}

impl Body for Swap {
    type Data = Bytes;
    type Error = aws_smithy_types::body::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if self.done {
            return Poll::Ready(None);
        }
        loop {
            match ready!(self.inner.as_mut().poll_frame(cx)) {
                Some(Ok(frame)) => {
                    if let Some(data) = frame.data_ref() {
                        self.read.extend_from_slice(data);
                    }
                }
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                None => break,
            }
        }
        self.done = true;
        let read = Bytes::from(std::mem::take(&mut self.read));
        *self.slot.0.lock().expect("listing body lock") = Some(read.clone());
        if root_element(&read) != Some(ROOT) {
            return Poll::Ready(Some(Ok(Frame::data(read))));
        }
        Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(
            EMPTY_PAGE.as_bytes(),
        )))))
    }
}

/// The name of an XML document's root element (after a BOM, the declaration, comments and
/// whitespace), or None when there is none.
fn root_element(doc: &[u8]) -> Option<&str> {
    let mut rest = doc.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(doc);
    loop {
        rest = rest.trim_ascii_start();
        if let Some(r) = rest.strip_prefix(b"<?") {
            rest = &r[r.windows(2).position(|w| w == b"?>")? + 2..];
        } else if let Some(r) = rest.strip_prefix(b"<!--") {
            rest = &r[r.windows(3).position(|w| w == b"-->")? + 3..];
        } else {
            break;
        }
    }
    let name = rest.strip_prefix(b"<")?;
    let end = name
        .iter()
        .position(|&b| b.is_ascii_whitespace() || b == b'>' || b == b'/')?;
    std::str::from_utf8(&name[..end]).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_root_element_after_prologue() {
        let page = b"\xEF\xBB\xBF<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<!-- x -->\n<ListVersionsResult xmlns=\"a\"><Name>b</Name></ListVersionsResult>";
        assert_eq!(root_element(page), Some(ROOT));
        assert_eq!(root_element(b"<ListVersionsResult>"), Some(ROOT));
        let error = b"<?xml version=\"1.0\"?><Error><Code>InternalError</Code></Error>";
        assert_eq!(root_element(error), Some("Error"));
        assert_eq!(root_element(b""), None);
        assert_eq!(root_element(b"<?xml unterminated"), None);
        assert_eq!(root_element(b"not xml"), None);
    }

    #[test]
    fn the_sdk_sees_an_empty_page_but_an_error_unchanged() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let read = |body: &'static str| {
            let slot = TakeListing::default();
            let swap = Swap {
                inner: Box::pin(SdkBody::from(body)),
                read: Vec::new(),
                slot: slot.clone(),
                done: false,
            };
            let sdk_sees = rt.block_on(async {
                let mut b = SdkBody::from_body_1_x(swap);
                let mut out = Vec::new();
                while let Some(f) = std::future::poll_fn(|cx| Pin::new(&mut b).poll_frame(cx)).await
                {
                    out.extend_from_slice(f.unwrap().data_ref().unwrap());
                }
                out
            });
            (String::from_utf8(sdk_sees).unwrap(), slot.take())
        };
        let page = "<ListVersionsResult><Version><Key>a</Key></Version></ListVersionsResult>";
        let (sdk, taken) = read(page);
        assert_eq!(sdk, EMPTY_PAGE);
        assert_eq!(taken.as_deref(), Some(page.as_bytes()));
        let error = "<Error><Code>SlowDown</Code></Error>";
        let (sdk, taken) = read(error);
        assert_eq!(sdk, error, "an error body reaches the SDK unchanged");
        assert_eq!(taken.as_deref(), Some(error.as_bytes()));
    }
}
