// Offline API docs: lists each operation of /openapi.json with its parameters, request body and responses.
"use strict";

(function () {
  function element(tag, text, className) {
    const node = document.createElement(tag);
    if (text !== undefined) node.textContent = text;
    if (className) node.className = className;
    return node;
  }

  function schemaText(schema) {
    if (!schema) return "";
    if (schema.$ref) return schema.$ref.split("/").pop();
    if (schema.anyOf) return schema.anyOf.map(schemaText).join(" | ");
    if (schema.type === "array") return `array of ${schemaText(schema.items)}`;
    return schema.format ? `${schema.type} (${schema.format})` : schema.type || "object";
  }

  function renderOperation(path, method, operation) {
    const section = element("section", undefined, "card docs-operation");
    section.dataset.testid = "operation";
    const heading = element("h2");
    heading.append(element("code", `${method.toUpperCase()} ${path}`));
    section.append(heading);
    if (operation.summary) section.append(element("p", operation.summary));
    if (operation.description) section.append(element("p", operation.description));

    const params = operation.parameters || [];
    if (params.length) {
      section.append(element("h3", "Query parameters"));
      const list = element("ul");
      for (const param of params) {
        const desc = param.description || (param.schema && param.schema.description) || "";
        list.append(element("li", `${param.name} (${schemaText(param.schema)}): ${desc}`));
      }
      section.append(list);
    }
    const body = operation.requestBody && operation.requestBody.content;
    if (body) {
      section.append(element("h3", "Request body"));
      const list = element("ul");
      for (const [type, content] of Object.entries(body)) {
        const props = (content.schema && content.schema.properties) || {};
        const fields = Object.entries(props).map(([name, schema]) =>
          `${name}: ${schemaText(schema)}${schema.description ? ` — ${schema.description}` : ""}`);
        list.append(element("li", `${type}${fields.length ? ` — ${fields.join("; ")}` : ""}`));
      }
      section.append(list);
    }
    section.append(element("h3", "Responses"));
    const responses = element("ul");
    for (const [code, response] of Object.entries(operation.responses || {})) {
      responses.append(element("li", `${code}: ${response.description || ""}`));
    }
    section.append(responses);
    return section;
  }

  document.addEventListener("DOMContentLoaded", async () => {
    const status = document.getElementById("docs-status");
    try {
      const response = await fetch("/openapi.json");
      const schema = await response.json();
      const container = document.getElementById("endpoints");
      for (const [path, operations] of Object.entries(schema.paths)) {
        for (const [method, operation] of Object.entries(operations)) {
          container.append(renderOperation(path, method, operation));
        }
      }
      status.textContent = `${schema.info.title} ${schema.info.version}: ${schema.info.description || ""}`;
    } catch (err) {
      status.textContent = `Could not load /openapi.json: ${err.message}`;
    }
  });
})();
