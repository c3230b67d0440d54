"""Key information: term libraries (libs/), the embedded rules extractor, standardisation, grounding,
Medical-CXR-VQA KeyInfo JSON import/export, and quality scoring.

- ``libs.load_libs()`` / ``libs.vqa_name(name)`` — the compiled libraries (cached);
- ``extract.extract_sections(sections)`` / ``extract.label_vector(text)`` — the rules backend;
- ``standardise.standardise(record, fmt)`` — LLM / KeyInfo JSON -> canonical rows + audit;
- ``grounding.ground(llm_rows, rules_rows, sections)`` — flags for the follow-up rounds;
- ``vqa_json`` — all_diseases.json import/export; ``evaluate`` — synthetic truth and IU label scores;
- ``run_rules`` — the ``keyinfo_rules`` Snakemake step.
"""
