//! `shardpress submit`: queue a compression job on the service.

use std::collections::HashMap;

use anyhow::{anyhow, bail, Result};
use serde_json::json;
use shardpress_engine::recipe::preset;
use shardpress_engine::Recipe;
use shardpress_proto::v1::{recipe, SubmitJobRequest};
use shardpress_storage::S3Uri;

use crate::service::{job_client, rpc_error, runtime, ClientArgs, OutputFormat};

/// Submit a compression job to the service; prints the job id.
///
/// The checkpoint under an S3 prefix is compressed into another prefix by the service's
/// workers. Follow it with `shardpress watch` or `shardpress status`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// s3://bucket/prefix/ of the input checkpoint.
    source: String,

    /// Preset name (bf16, fp16, w8a16, w4a16) or path to a recipe TOML file, which is read
    /// and validated here and sent in full.
    #[arg(long, short, env = "SHARDPRESS_RECIPE")]
    recipe: String,

    /// s3://bucket/prefix/ to write the compressed checkpoint under; must not overlap the input.
    #[arg(long, short, env = "SHARDPRESS_OUT")]
    out: String,

    /// Same key, same job: resubmitting with a key returns the job created first.
    /// Default: a fresh UUID, so every submit creates a job.
    #[arg(long, env = "SHARDPRESS_IDEMPOTENCY_KEY")]
    idempotency_key: Option<String>,

    /// A label `key=value` recorded with the job; repeat for more.
    #[arg(
        long = "label",
        value_name = "KEY=VALUE",
        env = "SHARDPRESS_LABELS",
        value_delimiter = ',',
        value_parser = parse_label
    )]
    labels: Vec<(String, String)>,

    #[command(flatten)]
    client: ClientArgs,
}

fn parse_label(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.to_string())),
        _ => Err(format!("expected KEY=VALUE, got {text:?}")),
    }
}

/// The recipe message for a preset name or a recipe file. A file is parsed and validated
/// here, so a wrong recipe is reported (with the rule and field) before anything is sent.
pub fn recipe_message(spec: &str) -> Result<shardpress_proto::v1::Recipe> {
    let source = if preset(spec).is_some() {
        recipe::Source::Preset(spec.to_string())
    } else {
        let recipe = Recipe::load(spec)?;
        recipe::Source::Toml(recipe.to_toml())
    };
    Ok(shardpress_proto::v1::Recipe {
        source: Some(source),
    })
}

/// The request the arguments describe; everything that can be checked without the
/// coordinator is checked here.
fn request(args: &Args) -> Result<SubmitJobRequest> {
    let source = S3Uri::parse(&args.source).map_err(|e| anyhow!("input: {e}"))?;
    let out = S3Uri::parse(&args.out).map_err(|e| anyhow!("--out: {e}"))?;
    if source.overlaps(&out) {
        bail!("--out {out} overlaps the input {source}; choose a prefix outside it");
    }
    let mut labels = HashMap::new();
    for (k, v) in &args.labels {
        if labels.insert(k.clone(), v.clone()).is_some() {
            bail!("label {k:?} given twice");
        }
    }
    let idempotency_key = match &args.idempotency_key {
        Some(k) if k.trim().is_empty() => bail!("--idempotency-key must not be empty"),
        Some(k) => k.clone(),
        None => uuid::Uuid::new_v4().to_string(),
    };
    Ok(SubmitJobRequest {
        source_uri: args.source.clone(),
        destination_uri: args.out.clone(),
        recipe: Some(recipe_message(&args.recipe)?),
        idempotency_key,
        labels,
    })
}

/// Runs the command.
pub fn run(args: Args) -> Result<()> {
    let request = request(&args)?;
    let response = runtime()?.block_on(async {
        let mut client = job_client(&args.client).await?;
        client
            .submit_job(request)
            .await
            .map(tonic::Response::into_inner)
            .map_err(rpc_error)
    })?;
    match args.client.output {
        OutputFormat::Text => {
            println!("{}", response.job_id);
            if !response.created {
                eprintln!("(an existing job with this idempotency key)");
            }
        }
        OutputFormat::Json => println!(
            "{}",
            json!({ "job_id": response.job_id, "created": response.created })
        ),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use shardpress_engine::recipe::RecipeFile;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        args: Args,
    }

    fn args(extra: &[&str]) -> Args {
        let mut argv = vec!["submit", "s3://inputs/m/", "--out", "s3://outputs/m/"];
        argv.extend_from_slice(extra);
        Cli::try_parse_from(argv).expect("parse").args
    }

    #[test]
    fn a_preset_is_sent_by_name() {
        let m = recipe_message("w8a16").expect("preset");
        assert_eq!(m.source, Some(recipe::Source::Preset("w8a16".into())));
    }

    #[test]
    fn a_file_is_validated_and_sent_in_full() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("mine.toml");
        let text = "name = \"mine\"\nignore = []\n\n[[rules]]\ntargets = [\"*.weight\"]\naction = \"quantize\"\nbits = 4\nstrategy = \"group\"\ngroup_size = 64\n";
        std::fs::write(&path, text).expect("write");
        let m = recipe_message(path.to_str().expect("utf-8")).expect("file");
        let Some(recipe::Source::Toml(sent)) = m.source else {
            panic!("expected a full recipe, got {:?}", m.source);
        };
        // The message carries exactly the recipe as written.
        let sent: RecipeFile = toml::from_str(&sent).expect("toml");
        let file: RecipeFile = toml::from_str(text).expect("toml");
        assert_eq!(sent, file);
        assert_eq!(sent.rules[0].group_size, Some(64));
        assert_eq!(sent.ignore, Some(vec![]));
    }

    #[test]
    fn a_wrong_recipe_file_fails_before_submitting() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("bad.toml");
        std::fs::write(
            &path,
            "[[rules]]\ntargets = [\"*.weight\"]\naction = \"quantize\"\nbits = 9\n",
        )
        .expect("write");
        let e = recipe_message(path.to_str().expect("utf-8")).expect_err("bad bits");
        assert!(e.to_string().contains("bits must be 2 to 8"), "{e}");
        let e = recipe_message("no-such-recipe").expect_err("missing");
        assert!(e.to_string().contains("not a preset"), "{e}");
    }

    #[test]
    fn request_has_labels_and_a_fresh_idempotency_key() {
        let a = args(&[
            "--recipe", "w4a16", "--label", "team=ml", "--label", "run=7",
        ]);
        let r1 = request(&a).expect("request");
        let r2 = request(&a).expect("request");
        assert_ne!(r1.idempotency_key, r2.idempotency_key);
        assert!(uuid::Uuid::parse_str(&r1.idempotency_key).is_ok());
        assert_eq!(r1.labels.get("team").map(String::as_str), Some("ml"));
        assert_eq!(r1.labels.get("run").map(String::as_str), Some("7"));
        assert_eq!(r1.source_uri, "s3://inputs/m/");
        assert_eq!(r1.destination_uri, "s3://outputs/m/");

        let keyed = args(&["--recipe", "w4a16", "--idempotency-key", "k1"]);
        assert_eq!(request(&keyed).expect("request").idempotency_key, "k1");
    }

    #[test]
    fn bad_labels_and_uris_are_refused() {
        let cli = Cli::try_parse_from([
            "submit",
            "s3://inputs/",
            "--out",
            "s3://outputs/",
            "--recipe",
            "w8a16",
            "--label",
            "novalue",
        ]);
        assert!(cli.is_err());
        let twice = args(&["--recipe", "w8a16", "--label", "a=1", "--label", "a=2"]);
        assert!(request(&twice)
            .expect_err("dup")
            .to_string()
            .contains("given twice"));
        let mut local = args(&["--recipe", "w8a16"]);
        local.source = "/data/model".into();
        assert!(request(&local).is_err());
        let mut nested = args(&["--recipe", "w8a16"]);
        nested.out = "s3://inputs/m/out/".into();
        assert!(request(&nested)
            .expect_err("overlap")
            .to_string()
            .contains("overlaps"));
    }
}
