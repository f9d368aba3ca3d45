//! Mapping stored rows onto API messages.

use chrono::{DateTime, SecondsFormat, Utc};
use shardpress_proto::v1::{Job, JobState, TaskCounts};

use crate::db::JobStatus;

/// The API enum for a stored job state.
pub fn job_state(s: &str) -> JobState {
    match s {
        "queued" => JobState::Queued,
        "running" => JobState::Running,
        "finalizing" => JobState::Finalizing,
        "succeeded" => JobState::Succeeded,
        "failed" => JobState::Failed,
        "cancelled" => JobState::Cancelled,
        _ => JobState::Unspecified,
    }
}

/// The stored name of an API job state.
pub fn state_name(s: JobState) -> Option<&'static str> {
    Some(match s {
        JobState::Queued => "queued",
        JobState::Running => "running",
        JobState::Finalizing => "finalizing",
        JobState::Succeeded => "succeeded",
        JobState::Failed => "failed",
        JobState::Cancelled => "cancelled",
        JobState::Unspecified => return None,
    })
}

fn ts(t: Option<DateTime<Utc>>) -> String {
    t.map(|t| t.to_rfc3339_opts(SecondsFormat::Millis, true))
        .unwrap_or_default()
}

/// The API message for a `job_status` row.
pub fn job(s: &JobStatus) -> Job {
    let labels = s
        .labels
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                .collect()
        })
        .unwrap_or_default();
    Job {
        job_id: s.job_id.to_string(),
        state: job_state(&s.state) as i32,
        source_uri: s.source_uri.clone(),
        destination_uri: s.destination_uri.clone(),
        recipe_name: s.recipe_name.clone(),
        labels,
        tasks: Some(TaskCounts {
            queued: s.tasks_queued as u32,
            leased: s.tasks_leased as u32,
            succeeded: s.tasks_succeeded as u32,
            failed: s.tasks_failed as u32,
            cancelled: s.tasks_cancelled as u32,
        }),
        tasks_total: s.tasks_total as u32,
        bytes_in: s.bytes_in as u64,
        bytes_out: s.bytes_out as u64,
        ratio: s.ratio.unwrap_or(0.0),
        error: s.error.clone().unwrap_or_default(),
        created_at: ts(Some(s.created_at)),
        started_at: ts(s.started_at),
        finished_at: ts(s.finished_at),
        idempotency_key: s.idempotency_key.clone(),
        progress: s.progress,
        memory_reserved_bytes: s.memory_reserved_bytes.max(0) as u64,
        memory_peak_bytes: s.memory_peak_bytes.max(0) as u64,
        memory_wait_ms: s.memory_wait_ms.max(0) as u64,
        memory_reuse_rate: s.memory_reuse_rate,
    }
}
