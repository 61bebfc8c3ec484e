"""The report's page: one Jinja2 template with inline CSS, no JavaScript and no external resource.

Jinja2 ships with PyTorch (one of its requirements), so it adds no dependency; autoescaping is on, so
every name, path and note from a run is escaped. Images arrive as ``data:image/png;base64`` URIs with
their natural width and height, so the browser shows them pixel for pixel.
"""

from __future__ import annotations

CSS = """
body { font-family: "DejaVu Sans", Arial, Helvetica, sans-serif; color: #1b1f24; background: #ffffff;
       margin: 0 auto; padding: 12px 20px 40px; max-width: 1140px; font-size: 14px; line-height: 1.4; }
h1 { font-size: 22px; margin: 8px 0 4px; }
h2 { font-size: 18px; margin: 28px 0 8px; padding-bottom: 4px; border-bottom: 2px solid #1f3b57; }
h3 { font-size: 15px; margin: 16px 0 6px; }
p.meta { color: #4a5561; margin: 2px 0 8px; }
nav a { margin-right: 14px; color: #1f3b57; }
table { border-collapse: collapse; margin: 6px 0 12px; }
th { background: #1f3b57; color: #ffffff; font-weight: bold; text-align: left; padding: 4px 10px; }
td { padding: 3px 10px; border-bottom: 1px solid #d5dbe1; }
tr:nth-child(even) td { background: #f2f5f8; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 8px 0 18px; }
figcaption { color: #4a5561; font-size: 13px; }
img { display: block; max-width: 100%; height: auto; }
.missing { color: #7a4b00; background: #fff6e0; padding: 6px 10px; border-left: 3px solid #e0a800; }
ul.notes { color: #4a5561; margin: 4px 0 10px; }
"""

TEMPLATE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>CIML report: {{ title }}</title>
<style>{{ css }}</style>
</head>
<body>
<h1>CIML report: {{ title }}</h1>
<p class="meta">{{ subtitle }}</p>
<nav>{% for id, name in sections %}<a href="#{{ id }}">{{ name }}</a>{% endfor %}</nav>

{% macro table(grid, numeric_from=1) -%}
<table>
<tr>{% for cell in grid[0] %}<th>{{ cell }}</th>{% endfor %}</tr>
{% for row in grid[1:] %}<tr>{% for cell in row %}
<td{% if loop.index0 >= numeric_from %} class="num"{% endif %}>{{ cell }}</td>{% endfor %}</tr>
{% endfor %}</table>
{%- endmacro %}

{% macro image(img) -%}
<figure><img src="{{ img.uri }}" width="{{ img.width }}" height="{{ img.height }}" alt="{{ img.caption }}">
<figcaption>{{ img.caption }}</figcaption></figure>
{%- endmacro %}

{% macro missing(text) -%}<p class="missing">{{ text }}</p>{%- endmacro %}

<section id="evaluation">
<h2>Evaluation</h2>
{% if evaluation.grid %}
<p>{{ evaluation.caption }}</p>
{{ table(evaluation.grid) }}
{% if evaluation.cases %}<h3>Per case</h3>{{ table(evaluation.cases) }}{% endif %}
{% else %}{{ missing(evaluation.missing) }}{% endif %}
</section>

<section id="cases">
<h2>Cases</h2>
{% if cases.images %}
<p>{{ cases.caption }}</p>
{% for img in cases.images %}{{ image(img) }}{% endfor %}
{% else %}{{ missing(cases.missing) }}{% endif %}
</section>

<section id="explanations">
<h2>Explanations</h2>
{% if explanations.cases %}
<p>{{ explanations.caption }}</p>
{% for case in explanations.cases %}
<h3>{{ case.case_id }}</h3>
<ul class="notes">{% for note in case.notes %}<li>{{ note }}</li>{% endfor %}</ul>
<p>Share of each modality in each segmentor's region (%):</p>
{{ table(case.fractions) }}
{% if case.information %}
<p>Information sent per message, nats per voxel (rows: receivers; columns: senders):</p>
{{ table(case.information) }}{% endif %}
{% for img in case.images %}{{ image(img) }}{% endfor %}
{% endfor %}
{% else %}{{ missing(explanations.missing) }}{% endif %}
</section>

<section id="robustness">
<h2>Robustness to missing modalities</h2>
{% if robustness.grid %}
<p>{{ robustness.caption }}</p>
{{ table(robustness.grid) }}
{% if robustness.notes %}
<ul class="notes">{% for note in robustness.notes %}<li>{{ note }}</li>{% endfor %}</ul>
{% endif %}
{% if robustness.contributions %}
<h3>Marginal contribution of each modality</h3>
<p>Mean, over the subsets S that lack the modality, of Dice(S + modality) - Dice(S); brackets: 95 %
patient-level bootstrap intervals; pairs: subsets averaged.</p>
{{ table(robustness.contributions) }}
{% endif %}
{% else %}{{ missing(robustness.missing) }}{% endif %}
</section>

<section id="training">
<h2>Training</h2>
{% if training.folds %}
{{ table(training.grid) }}
{% for img in training.images %}{{ image(img) }}{% endfor %}
{% else %}{{ missing(training.missing) }}{% endif %}
</section>

<section id="configuration">
<h2>Configuration and task decomposition</h2>
<h3>Task decomposition</h3>
<p>{{ config.decomposition_caption }}</p>
{{ table(config.decomposition, 99) }}
<h3>Regions</h3>
{{ table(config.regions, 99) }}
<h3>Run</h3>
{{ table(config.run, 99) }}
<h3>Preprocessing</h3>
{{ table(config.preprocessing, 99) }}
{% if config.train %}<h3>Training settings</h3>{{ table(config.train, 99) }}{% endif %}
</section>
<p class="meta">Written by ciml {{ version }} on {{ created }}. Self-contained: every image is embedded.</p>
</body>
</html>
"""
