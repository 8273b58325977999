//! `plan put|list|show`.

use stagecoach_proto::v1::put_plan_request::Source;
use stagecoach_proto::v1::{GetPlanRequest, ListPlansRequest, PutPlanRequest};

use super::{Outcome, need};
use crate::connect::Session;
use crate::error::CliError;
use crate::output::Out;
use crate::output::plans::{PlanDetail, PlanList, PlanStored};

/// Stores the plan (JSON text, as read from its file).
pub async fn put(s: &Session, out: Out, plan_json: String) -> Result<Outcome, CliError> {
    let reply = s
        .migrations
        .clone()
        .put_plan(PutPlanRequest {
            source: Some(Source::PlanJson(plan_json)),
        })
        .await?
        .into_inner();
    out.print(&PlanStored(&need(reply.plan, "PutPlan", "plan")?))?;
    Ok(Outcome::Success)
}

/// Every plan, page after page.
pub async fn list(s: &Session, out: Out) -> Result<Outcome, CliError> {
    let mut plans = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = s
            .migrations
            .clone()
            .list_plans(ListPlansRequest {
                page_size: 1000,
                page_token: page_token.clone(),
                include_tasks: false,
            })
            .await?
            .into_inner();
        plans.extend(page.plans);
        if page.next_page_token.is_empty() || page.next_page_token == page_token {
            break;
        }
        page_token = page.next_page_token;
    }
    out.print(&PlanList(&plans))?;
    Ok(Outcome::Success)
}

/// One plan; with `version`, only if that is the latest.
pub async fn show(
    s: &Session,
    out: Out,
    name: &str,
    version: Option<u32>,
) -> Result<Outcome, CliError> {
    let reply = s
        .migrations
        .clone()
        .get_plan(GetPlanRequest {
            name: name.to_string(),
        })
        .await?
        .into_inner();
    let plan = need(reply.plan, "GetPlan", "plan")?;
    if let Some(v) = version
        && v != plan.version
    {
        return Err(CliError::BadFlag {
            flag: "--version",
            value: v.to_string(),
            reason: format!(
                "the latest version of plan {name} is {}, and the coordinator serves only the latest (GetPlan has no version)",
                plan.version
            ),
        });
    }
    out.print(&PlanDetail(&plan))?;
    Ok(Outcome::Success)
}
