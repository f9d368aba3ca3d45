//! `JobService`: submit, inspect, watch and cancel jobs.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};
use uuid::Uuid;

use shardpress_engine::recipe::{preset, preset_names};
use shardpress_engine::Recipe;
use shardpress_proto::v1::job_service_server::JobService;
use shardpress_proto::v1::{
    recipe, CancelJobRequest, GetJobRequest, Job, JobEvent, JobState, ListJobsRequest,
    ListJobsResponse, SubmitJobRequest, SubmitJobResponse, WatchJobRequest,
};
use shardpress_storage::S3Uri;

use crate::convert::{job, state_name};
use crate::db::{NewJob, TERMINAL};
use crate::error::{parse_id, ApiError};
use crate::planner::{plan, Planned};
use crate::Ctx;

const MAX_LABELS: usize = 64;
/// Largest recipe text accepted.
const MAX_RECIPE_BYTES: usize = 256 * 1024;
const MAX_LABEL_LEN: usize = 256;
const MAX_KEY_LEN: usize = 256;

/// The job API.
#[derive(Debug, Clone)]
pub struct Jobs {
    ctx: Arc<Ctx>,
}

impl Jobs {
    /// Serves jobs from `ctx`.
    pub fn new(ctx: Arc<Ctx>) -> Self {
        Self { ctx }
    }

    async fn get(&self, id: Uuid) -> Result<Job, ApiError> {
        let s = self
            .ctx
            .store
            .status(id)
            .await?
            .ok_or_else(|| ApiError::NotFound(format!("no job {id}")))?;
        Ok(job(&s))
    }
}

/// Validates and converts the recipe of a submit.
fn recipe_of(r: Option<&shardpress_proto::v1::Recipe>) -> Result<Recipe, ApiError> {
    let source = r
        .and_then(|r| r.source.as_ref())
        .ok_or_else(|| ApiError::Invalid("recipe is required (a preset name or a spec)".into()))?;
    let recipe = match source {
        recipe::Source::Preset(name) => {
            let text = preset(name).ok_or_else(|| {
                ApiError::Invalid(format!(
                    "unknown preset {name:?}; presets: {}",
                    preset_names().join(", ")
                ))
            })?;
            Recipe::from_toml(text, &format!("preset {name:?}"))
        }
        recipe::Source::Toml(text) => {
            if text.len() > MAX_RECIPE_BYTES {
                return Err(ApiError::Invalid(format!(
                    "recipe is {} bytes; at most {MAX_RECIPE_BYTES} are accepted",
                    text.len()
                )));
            }
            Recipe::from_toml(text, "in request")
        }
    };
    recipe.map_err(|e| ApiError::Invalid(e.to_string()))
}

fn validate_labels(
    labels: &std::collections::HashMap<String, String>,
) -> Result<serde_json::Value, ApiError> {
    if labels.len() > MAX_LABELS {
        return Err(ApiError::Invalid(format!(
            "at most {MAX_LABELS} labels, got {}",
            labels.len()
        )));
    }
    let mut sorted = BTreeMap::new();
    for (k, v) in labels {
        if k.is_empty() || k.len() > MAX_LABEL_LEN || v.len() > MAX_LABEL_LEN {
            return Err(ApiError::Invalid(format!(
                "label {k:?}: keys must be 1..{MAX_LABEL_LEN} bytes and values at most {MAX_LABEL_LEN}"
            )));
        }
        sorted.insert(k.clone(), v.clone());
    }
    Ok(serde_json::to_value(sorted).unwrap_or_default())
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<JobEvent, Status>> + Send>>;

#[tonic::async_trait]
impl JobService for Jobs {
    async fn submit_job(
        &self,
        request: Request<SubmitJobRequest>,
    ) -> Result<Response<SubmitJobResponse>, Status> {
        let req = request.into_inner();
        let source = S3Uri::parse(&req.source_uri)
            .map_err(|e| ApiError::Invalid(format!("source_uri: {e}")))?;
        let dest = S3Uri::parse(&req.destination_uri)
            .map_err(|e| ApiError::Invalid(format!("destination_uri: {e}")))?;
        if source.overlaps(&dest) {
            return Err(ApiError::Invalid(format!(
                "destination {dest} overlaps source {source}; choose a prefix outside the input"
            ))
            .into());
        }
        let recipe = recipe_of(req.recipe.as_ref())?;
        let labels = validate_labels(&req.labels)?;
        if req.idempotency_key.len() > MAX_KEY_LEN {
            return Err(ApiError::Invalid(format!(
                "idempotency_key is longer than {MAX_KEY_LEN} bytes"
            ))
            .into());
        }
        let key = if req.idempotency_key.is_empty() {
            Uuid::new_v4().to_string()
        } else {
            req.idempotency_key.clone()
        };
        if let Some(id) = self
            .ctx
            .store
            .job_by_key(&key)
            .await
            .map_err(ApiError::from)?
        {
            return Ok(Response::new(SubmitJobResponse {
                job_id: id.to_string(),
                created: false,
            }));
        }
        let planned = plan(&self.ctx.objects, &source, &recipe).await?;
        let (tasks, files, error) = match planned {
            Planned::Ok { tasks, files } => (tasks, files, None),
            Planned::Failed(e) => (Vec::new(), Default::default(), Some(e)),
        };
        let id = Uuid::new_v4();
        let (id, created) = self
            .ctx
            .store
            .insert_job(NewJob {
                id,
                idempotency_key: &key,
                source_uri: &source.to_string(),
                destination_uri: &dest.to_string(),
                recipe_name: &recipe.name,
                recipe: &recipe.source,
                labels,
                files: &files,
                tasks: &tasks,
                max_attempts: self.ctx.max_attempts as i32,
                error,
            })
            .await
            .map_err(ApiError::from)?;
        tracing::info!(job_id = %id, created, tasks = tasks.len(), "job submitted");
        Ok(Response::new(SubmitJobResponse {
            job_id: id.to_string(),
            created,
        }))
    }

    async fn get_job(&self, request: Request<GetJobRequest>) -> Result<Response<Job>, Status> {
        let id = parse_id("job_id", &request.get_ref().job_id)?;
        Ok(Response::new(self.get(id).await?))
    }

    async fn list_jobs(
        &self,
        request: Request<ListJobsRequest>,
    ) -> Result<Response<ListJobsResponse>, Status> {
        let req = request.into_inner();
        let mut states = Vec::new();
        for s in &req.states {
            let st = JobState::try_from(*s)
                .ok()
                .and_then(state_name)
                .ok_or_else(|| ApiError::Invalid(format!("unknown job state {s}")))?;
            states.push(st.to_string());
        }
        let size = match req.page_size {
            0 => 50,
            n => n.min(500),
        } as i64;
        let after = if req.page_token.is_empty() {
            None
        } else {
            Some(parse_token(&req.page_token)?)
        };
        let rows = self
            .ctx
            .store
            .list(&states, after, size + 1)
            .await
            .map_err(ApiError::from)?;
        let more = rows.len() as i64 > size;
        let rows = &rows[..rows.len().min(size as usize)];
        let next_page_token = match (more, rows.last()) {
            (true, Some(last)) => format!("{}_{}", last.created_at.timestamp_micros(), last.job_id),
            _ => String::new(),
        };
        Ok(Response::new(ListJobsResponse {
            jobs: rows.iter().map(job).collect(),
            next_page_token,
        }))
    }

    type WatchJobStream = WatchStream;

    async fn watch_job(
        &self,
        request: Request<WatchJobRequest>,
    ) -> Result<Response<Self::WatchJobStream>, Status> {
        let id = parse_id("job_id", &request.get_ref().job_id)?;
        let first = self.get(id).await?;
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        let ctx = self.ctx.clone();
        tokio::spawn(async move {
            let mut last = first;
            if tx
                .send(Ok(JobEvent {
                    job: Some(last.clone()),
                    message: "current state".into(),
                }))
                .await
                .is_err()
            {
                return;
            }
            loop {
                if is_terminal(&last) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
                let next = match ctx.store.status(id).await {
                    Ok(Some(s)) => job(&s),
                    Ok(None) => {
                        let _ = tx
                            .send(Err(Status::not_found(format!("job {id} was deleted"))))
                            .await;
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "watch: database error");
                        continue;
                    }
                };
                if next != last {
                    let message = describe_change(&last, &next);
                    last = next;
                    if tx
                        .send(Ok(JobEvent {
                            job: Some(last.clone()),
                            message,
                        }))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn cancel_job(
        &self,
        request: Request<CancelJobRequest>,
    ) -> Result<Response<Job>, Status> {
        let id = parse_id("job_id", &request.get_ref().job_id)?;
        let current = self.get(id).await?;
        if current.state == JobState::Cancelled as i32 {
            return Ok(Response::new(current));
        }
        if !self.ctx.store.cancel(id).await.map_err(ApiError::from)? {
            let now = self.get(id).await?;
            if now.state != JobState::Cancelled as i32 {
                let state =
                    state_name(JobState::try_from(now.state).unwrap_or_default()).unwrap_or("?");
                return Err(ApiError::Precondition(format!("job {id} already {state}")).into());
            }
        }
        Ok(Response::new(self.get(id).await?))
    }
}

fn is_terminal(j: &Job) -> bool {
    JobState::try_from(j.state)
        .ok()
        .and_then(state_name)
        .is_some_and(|s| TERMINAL.contains(&s))
}

fn describe_change(a: &Job, b: &Job) -> String {
    if a.state != b.state {
        let name = |s: i32| {
            JobState::try_from(s)
                .ok()
                .and_then(state_name)
                .unwrap_or("?")
        };
        return format!("{} -> {}", name(a.state), name(b.state));
    }
    let done = b.tasks.as_ref().map_or(0, |t| t.succeeded);
    format!("{done}/{} tasks done", b.tasks_total)
}

fn parse_token(t: &str) -> Result<(DateTime<Utc>, Uuid), ApiError> {
    let bad = || ApiError::Invalid(format!("page_token {t:?} is not one this server issued"));
    let (micros, id) = t.split_once('_').ok_or_else(bad)?;
    let micros: i64 = micros.parse().map_err(|_| bad())?;
    let at = DateTime::from_timestamp_micros(micros).ok_or_else(bad)?;
    let id = Uuid::parse_str(id).map_err(|_| bad())?;
    Ok((at, id))
}
