//! Planning a job from the source checkpoint's headers on object storage.

use shardpress_engine::pipeline::{plan_job, JobFiles, TaskSpec};
use shardpress_engine::Recipe;
use shardpress_storage::{open_checkpoint_versions, ObjectStore, S3Uri};

use crate::error::ApiError;

/// The outcome of planning.
#[derive(Debug)]
pub enum Planned {
    /// Tasks to run and files for the finalizer.
    Ok {
        /// One task per output shard.
        tasks: Vec<TaskSpec>,
        /// Config and files to copy.
        files: JobFiles,
    },
    /// The input cannot be compressed; the job is stored failed with this message.
    Failed(String),
}

/// Reads only the headers (and small JSON files) under `source` and plans the job; each task
/// input records the entity tag its file had, so workers read that version or fail. Transient
/// storage trouble is an `Unavailable` error (nothing stored, the client retries); a bad or
/// missing input is a `Failed` plan.
pub async fn plan(
    objects: &ObjectStore,
    source: &S3Uri,
    recipe: &Recipe,
) -> Result<Planned, ApiError> {
    let (ckpt, etags) = match open_checkpoint_versions(objects, source).await {
        Ok(c) => c,
        Err(e) if e.is_retryable() => {
            return Err(ApiError::Unavailable(format!("reading {source}: {e}")))
        }
        Err(e) => return Ok(Planned::Failed(e.to_string())),
    };
    let recipe = recipe.clone();
    let planned = tokio::task::spawn_blocking(move || {
        plan_job(&ckpt, &recipe).map(|p| (p.tasks, JobFiles::of(&ckpt)))
    })
    .await
    .map_err(|e| ApiError::Internal(format!("planning task: {e}")))?;
    Ok(match planned {
        Ok((tasks, files)) if tasks.is_empty() => {
            let _ = files;
            Planned::Failed(format!("{source}: the checkpoint has no tensors"))
        }
        Ok((mut tasks, files)) => {
            for input in tasks.iter_mut().flat_map(|t| t.inputs.iter_mut()) {
                input.etag = etags.get(&input.file).cloned();
            }
            Planned::Ok { tasks, files }
        }
        Err(e) => Planned::Failed(e.to_string()),
    })
}
