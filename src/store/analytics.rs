//! Read-only queries over `request_log` for the `stats` command.

use chrono::NaiveDateTime;
use diesel::prelude::*;

use super::schema::request_log;
use super::{Conn, RequestLogRow, Store, StoreError};

/// Rows fetched per query: each page is a short blocking task, so a large window never holds
/// one pooled connection (or one huge result buffer) for the whole read.
const PAGE: i64 = 5_000;

impl Store {
    /// Every `request_log` row created at or after `since`, ordered by `created_at` (then id),
    /// read page by page with a keyset so rows written meanwhile are neither skipped nor
    /// repeated.
    pub async fn request_log_since(
        &self,
        since: NaiveDateTime,
    ) -> Result<Vec<RequestLogRow>, StoreError> {
        let mut rows: Vec<RequestLogRow> = Vec::new();
        let mut after: Option<(NaiveDateTime, String)> = None;
        loop {
            let cursor = after.clone();
            let page: Vec<RequestLogRow> = self
                .run(move |conn| {
                    Ok(db!(conn, |c| {
                        let mut q = request_log::table
                            .filter(request_log::created_at.ge(since))
                            .into_boxed();
                        if let Some((at, id)) = &cursor {
                            q = q.filter(
                                request_log::created_at.gt(*at).or(request_log::created_at
                                    .eq(*at)
                                    .and(request_log::id.gt(id.clone()))),
                            );
                        }
                        q.order((request_log::created_at, request_log::id))
                            .limit(PAGE)
                            .load::<RequestLogRow>(c)
                    })?)
                })
                .await?;
            let full = page.len() as i64 == PAGE;
            after = page.last().map(|r| (r.created_at, r.id.clone()));
            rows.extend(page);
            if !full {
                return Ok(rows);
            }
        }
    }
}
