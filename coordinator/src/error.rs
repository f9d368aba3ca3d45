//! Errors of the coordinator's API, mapped onto gRPC codes.

use tonic::Status;

/// An API error.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The request is malformed; nothing was stored.
    #[error("{0}")]
    Invalid(String),
    /// No such job.
    #[error("{0}")]
    NotFound(String),
    /// The caller's lease or the job's state does not allow this.
    #[error("{0}")]
    Precondition(String),
    /// A dependency (database, object store) is unavailable; retry.
    #[error("{0}")]
    Unavailable(String),
    /// A bug or unexpected failure.
    #[error("{0}")]
    Internal(String),
}

impl From<ApiError> for Status {
    fn from(e: ApiError) -> Self {
        match e {
            ApiError::Invalid(m) => Status::invalid_argument(m),
            ApiError::NotFound(m) => Status::not_found(m),
            ApiError::Precondition(m) => Status::failed_precondition(m),
            ApiError::Unavailable(m) => Status::unavailable(m),
            ApiError::Internal(m) => Status::internal(m),
        }
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        if database_unavailable(&e) {
            ApiError::Unavailable(format!("database unavailable: {e}"))
        } else {
            ApiError::Internal(format!("database error: {e}"))
        }
    }
}

/// Whether `e` means the database is down or going away (connection lost, server shutting
/// down or starting up) rather than a failed statement: callers may retry these.
pub fn database_unavailable(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::PoolTimedOut
        | sqlx::Error::Io(_)
        | sqlx::Error::PoolClosed
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_) => true,
        // SQLSTATE class 08 (connection exception) and 57P01..57P03 (admin or crash
        // shutdown, cannot connect now).
        sqlx::Error::Database(db) => db
            .code()
            .is_some_and(|code| code.starts_with("08") || code.starts_with("57P")),
        _ => false,
    }
}

impl From<anyhow::Error> for ApiError {
    fn from(e: anyhow::Error) -> Self {
        match e.downcast::<sqlx::Error>() {
            Ok(s) => s.into(),
            Err(e) => ApiError::Internal(format!("{e:#}")),
        }
    }
}

/// Parses a UUID field.
pub fn parse_id(field: &str, value: &str) -> Result<uuid::Uuid, ApiError> {
    uuid::Uuid::parse_str(value)
        .map_err(|_| ApiError::Invalid(format!("{field} {value:?} is not a UUID")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lost_database_is_unavailable_and_a_bad_statement_is_internal() {
        let lost = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset");
        for e in [
            sqlx::Error::PoolTimedOut,
            sqlx::Error::PoolClosed,
            sqlx::Error::Io(lost),
        ] {
            assert!(database_unavailable(&e), "{e}");
            assert_eq!(
                Status::from(ApiError::from(e)).code(),
                tonic::Code::Unavailable
            );
        }
        let e = sqlx::Error::RowNotFound;
        assert!(!database_unavailable(&e));
        assert_eq!(
            Status::from(ApiError::from(e)).code(),
            tonic::Code::Internal
        );
    }
}
