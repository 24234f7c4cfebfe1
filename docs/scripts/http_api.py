"""Append the HTTP API's schema to docs/reference/http-api.md from the app's own OpenAPI document, at build time.

`build_app` declares the routes and their pydantic models without loading a model; `app.openapi()` is what the
server publishes at /openapi.json, so the page cannot drift from it. mkdocs-gen-files runs this file (mkdocs.yml).
"""

from __future__ import annotations

PAGE = "reference/http-api.md"


def _cell(text: object) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _type(schema: dict) -> str:
    """A field's type in short: `string`, `array of Mask`, `integer or null` ..."""
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[1]
        return f"[{name}](#{name.lower()})"
    if "anyOf" in schema:
        return " or ".join(_type(option) for option in schema["anyOf"])
    if "enum" in schema:
        return " \\| ".join(f"`{value}`" for value in schema["enum"])
    if "const" in schema:
        return f"`{schema['const']}`"
    if schema.get("type") == "array":
        return f"array of {_type(schema.get('items', {}))}"
    return schema.get("format", schema.get("type", "any"))


def _default(schema: dict) -> str:
    return f"`{schema['default']}`" if "default" in schema and schema["default"] is not None else ""


def _route(path: str, method: str, operation: dict) -> list[str]:
    lines = [f"### `{method.upper()} {path}`", "", operation.get("description", ""), ""]
    body = operation.get("requestBody", {}).get("content", {})
    for media, content in body.items():
        lines.append(f"Request body ({media}): {_type(content['schema'])}")
        lines.append("")
    parameters = [p for p in operation.get("parameters", []) if p["in"] == "path"]
    for parameter in parameters:
        lines += [f"Path parameter `{parameter['name']}`: {_type(parameter['schema'])}", ""]
    if operation.get("security"):
        lines += ["Token: `Authorization: Bearer TOKEN` as the [status codes](#status-codes) say.", ""]
    answers = []
    for status, response in operation["responses"].items():
        content = response.get("content", {})
        kind = next(iter(content), "")
        if status.startswith("2"):
            schema = content.get(kind, {}).get("schema", {})
            answers.append(f"{status}: {_type(schema) if schema else kind}")
    lines += [f"Answers {'; '.join(answers)}; errors as [ErrorResponse](#errorresponse).", ""]
    return lines


def _model(name: str, schema: dict) -> list[str]:
    lines = [f"### {name}", ""]
    if schema.get("description"):
        lines += [_cell(schema["description"]), ""]
    required = set(schema.get("required", []))
    lines += ["| field | type | required | default | description |", "|---|---|---|---|---|"]
    for field, spec in schema.get("properties", {}).items():
        lines.append(
            f"| `{field}` | {_type(spec)} | {'yes' if field in required else ''} | {_default(spec)} | "
            f"{_cell(spec.get('description', ''))} |"
        )
    return [*lines, ""]


def schema_markdown() -> str:
    """The generated part of the page: every route, then every model."""
    from sam2_peft.serving.app import ServeConfig, build_app

    document = build_app(ServeConfig(model="MODEL")).openapi()
    lines = [
        "## Routes and models (generated)",
        "",
        f"Generated from the server's OpenAPI {document['openapi']} document (`docs/scripts/http_api.py`); a running "
        "server publishes the same document at `/openapi.json` and interactive docs at `/docs`.",
        "",
    ]
    for path, methods in document["paths"].items():
        for method, operation in methods.items():
            lines += _route(path, method, operation)
    lines += ["## Models (generated)", ""]
    for name, schema in document["components"]["schemas"].items():
        lines += _model(name, schema)
    return "\n".join(lines)


def write_page() -> None:
    import mkdocs_gen_files

    with mkdocs_gen_files.open(PAGE, "a") as file:
        file.write("\n" + schema_markdown())


if __name__ in ("__main__", "<run_path>"):
    write_page()
