//! Finalizing a job: once every task is done, write the index, config, copied files and
//! report next to the shards, and only then mark the job succeeded.

use bytes::Bytes;
use uuid::Uuid;

use shardpress_engine::checkpoint::INDEX_FILE;
use shardpress_engine::pipeline::{finalize_metadata, json_bytes};
use shardpress_engine::Recipe;
use shardpress_storage::S3Uri;

use crate::Ctx;

/// How long a finalizer owns a job before another replica may take over.
pub const FINALIZE_LEASE_SECS: f64 = 60.0;

/// Finalizes `job` if it is ready and no one else is finalizing it. Failures are recorded on
/// the job; transient ones leave it for the next sweep.
pub async fn finalize(ctx: &Ctx, job: Uuid) {
    match try_finalize(ctx, job).await {
        Ok(true) => tracing::info!(job_id = %job, "job succeeded"),
        Ok(false) => {}
        Err(Failure::Retry(e)) => {
            tracing::warn!(job_id = %job, error = %e, "finalize failed; will retry");
            let _ = ctx.store.event(job, "finalize-retry", &e).await;
        }
        Err(Failure::Fatal(e)) => {
            tracing::error!(job_id = %job, error = %e, "finalize failed");
            let _ = ctx.store.fail_job(job, &e).await;
        }
    }
}

enum Failure {
    Retry(String),
    Fatal(String),
}

async fn try_finalize(ctx: &Ctx, job: Uuid) -> Result<bool, Failure> {
    let Some(input) = ctx
        .store
        .claim_finalize(job, FINALIZE_LEASE_SECS)
        .await
        .map_err(|e| Failure::Retry(format!("{e:#}")))?
    else {
        return Ok(false);
    };
    let fatal = |e: String| Failure::Fatal(format!("finalize: {e}"));
    let source = S3Uri::parse(&input.source_uri).map_err(|e| fatal(e.to_string()))?;
    let dest = S3Uri::parse(&input.destination_uri).map_err(|e| fatal(e.to_string()))?;
    let recipe = Recipe::from_file(input.recipe.clone(), "stored recipe")
        .map_err(|e| fatal(e.to_string()))?;
    let storage = |e: shardpress_storage::StorageError| {
        if e.is_retryable() {
            Failure::Retry(e.to_string())
        } else {
            fatal(e.to_string())
        }
    };
    // Every shard must be where its spec puts it, with the size and entity tag its worker saw
    // right after the upload: a shard replaced, truncated or deleted since fails the job
    // rather than being indexed.
    let mut specs = Vec::with_capacity(input.tasks.len());
    let mut outputs = Vec::with_capacity(input.tasks.len());
    for done in input.tasks {
        let key = &done.key;
        let object = format!("s3://{}/{key}", dest.bucket);
        if *key != dest.key(&done.spec.file_name) {
            return Err(fatal(format!(
                "task {} reported its shard at {object}, not at {}",
                done.spec.key,
                dest.key(&done.spec.file_name)
            )));
        }
        let meta = ctx.objects.head(&dest.bucket, key).await.map_err(storage)?;
        match meta {
            Some(m) if m.size as i64 != done.bytes => {
                return Err(fatal(format!(
                    "{object} is {} bytes but its task reported {}",
                    m.size, done.bytes
                )))
            }
            Some(m) => match (&done.etag, &m.etag) {
                (Some(want), Some(got)) if want != got => {
                    return Err(fatal(format!(
                        "{object} changed after its task uploaded it (ETag {got:?}, uploaded as \
                         {want:?}; SHA-256 of the upload {})",
                        done.sha256
                    )))
                }
                _ => {}
            },
            None => return Err(fatal(format!("{object} is missing"))),
        }
        specs.push(done.spec);
        outputs.push(done.output);
    }
    let fin = finalize_metadata(&recipe, &specs, outputs, &input.files);
    for rel in &input.files.other_files {
        if rel == "config.json" && fin.config.is_some() {
            continue;
        }
        ctx.objects
            .copy(
                &source.bucket,
                &source.key(rel),
                &dest.bucket,
                &dest.key(rel),
            )
            .await
            .map_err(storage)?;
    }
    let put = |name: &str, bytes: Vec<u8>| {
        let key = dest.key(name);
        let objects = ctx.objects.clone();
        let bucket = dest.bucket.clone();
        async move { objects.put(&bucket, &key, Bytes::from(bytes)).await }
    };
    put(INDEX_FILE, json_bytes(&fin.index))
        .await
        .map_err(storage)?;
    if let Some(c) = &fin.config {
        put("config.json", json_bytes(c)).await.map_err(storage)?;
    }
    put("report.json", json_bytes(&fin.report))
        .await
        .map_err(storage)?;
    let md = shardpress_engine::report_render::to_markdown(&fin.report);
    put("report.md", md.into_bytes()).await.map_err(storage)?;
    let html = shardpress_engine::report_render::to_html(&fin.report);
    put("report.html", html.into_bytes())
        .await
        .map_err(storage)?;
    ctx.store
        .succeed(job)
        .await
        .map_err(|e| Failure::Retry(e.to_string()))
}
