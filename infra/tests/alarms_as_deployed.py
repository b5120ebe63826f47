"""The CloudFormation template's CloudWatch alarms as PutMetricAlarm inputs, resolved for
one deployed stack.

moto's CloudFormation skips AWS::CloudWatch::Alarm, so `tests/tests/infra.rs` deploys the
stack, then puts each alarm this prints into the emulator's CloudWatch and reads it back:
what the template declares, with the stack's own parameters, names and resources.

    python alarms_as_deployed.py TEMPLATE CONTEXT_JSON

CONTEXT_JSON maps parameter names (every parameter; defaults filled in here), pseudo
parameters (AWS::StackName, AWS::Region, AWS::AccountId) and logical resource ids to
their values (a resource's physical id). `Fn::GetAtt X.QueueName` is read from the
queue's URL. Prints a JSON list of PutMetricAlarm inputs; alarms whose condition is false
are left out.
"""

from __future__ import annotations

import json
import re
import sys

from cfnlint.decode import decode


def main() -> None:
    template_path, context_json = sys.argv[1], sys.argv[2]
    template, errors = decode(template_path)
    if errors:
        sys.exit(f"{template_path}: {errors}")
    context = json.loads(context_json)
    for name, p in template.get("Parameters", {}).items():
        context.setdefault(name, str(p.get("Default", "")))
    conditions = template.get("Conditions", {})

    def resolve(v):
        if isinstance(v, list):
            return [resolve(x) for x in v]
        if not isinstance(v, dict):
            return v
        if len(v) != 1:
            return {k: resolve(x) for k, x in v.items()}
        (fn, arg), = v.items()
        if fn == "Ref":
            if arg not in context:
                sys.exit(f"no value for Ref {arg}")
            return context[arg]
        if fn == "Fn::GetAtt":
            logical, attr = arg if isinstance(arg, list) else arg.split(".", 1)
            if attr == "QueueName":
                return context[logical].rstrip("/").rsplit("/", 1)[-1]
            if attr == "Arn" and logical + ".Arn" in context:
                return context[logical + ".Arn"]
            sys.exit(f"GetAtt {logical}.{attr} is not resolved here")
        if fn == "Fn::Sub":
            text = arg if isinstance(arg, str) else arg[0]

            def one(m):
                ref = m.group(1)
                if "." in ref:
                    return str(resolve({"Fn::GetAtt": ref.split(".", 1)}))
                return str(resolve({"Ref": ref}))

            return re.sub(r"\$\{([^}!]+)\}", one, text)
        if fn == "Fn::If":
            cond, yes, no = arg
            return resolve(yes if holds(cond) else no)
        return {fn: resolve(arg)}

    def holds(name_or_expr) -> bool:
        expr = conditions[name_or_expr] if isinstance(name_or_expr, str) else name_or_expr
        (fn, arg), = expr.items()
        if fn == "Fn::Equals":
            a, b = (resolve(x) for x in arg)
            return str(a) == str(b)
        if fn == "Fn::Not":
            return not holds(arg[0])
        if fn == "Fn::And":
            return all(holds(x) for x in arg)
        if fn == "Fn::Or":
            return any(holds(x) for x in arg)
        if fn == "Condition":
            return holds(arg)
        sys.exit(f"condition function {fn} is not evaluated here")

    out = []
    for logical, r in template["Resources"].items():
        if r["Type"] != "AWS::CloudWatch::Alarm":
            continue
        if "Condition" in r and not holds(r["Condition"]):
            continue
        props = resolve(r["Properties"])
        props.setdefault("AlarmName", f"{context['AWS::StackName']}-{logical}")
        # The API takes numbers where the template's parameters are strings.
        for key in ("Threshold",):
            props[key] = float(props[key])
        for key in ("Period", "EvaluationPeriods", "DatapointsToAlarm"):
            if key in props:
                props[key] = int(props[key])
        props["LogicalId"] = logical
        out.append(props)
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
