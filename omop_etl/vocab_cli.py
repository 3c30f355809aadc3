"""`twinfed vocab ...`: load the site's OMOP vocabulary (an Athena download), see which one is loaded, and
load the hospital's own code mappings into source_to_concept_map (`vocab map`).

Heavy imports happen inside the commands, so `twinfed --help` stays instant.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

console = Console()

vocab_app = typer.Typer(
    help="Load the OMOP Standardized Vocabularies (an Athena download) into the site's OMOP database, check "
    "which vocabulary release is loaded, and load the hospital's own code mappings (Usagi's "
    "source_to_concept_map export). Every hospital of a consortium should load the same release.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)

VOCABULARY_TABLES = (
    "concept", "vocabulary", "domain", "concept_class", "relationship", "concept_relationship",
    "concept_synonym", "concept_ancestor", "drug_strength",
)  # fmt: skip

DbOption = Annotated[
    str,
    typer.Option(
        "--db",
        help="OMOP database URL, e.g. sqlite:///omop.sqlite or postgresql://user@host:5432/dbname "
        "(a password in the URL is never printed).",
    ),
]
SchemaOption = Annotated[
    str | None,
    typer.Option("--schema", help="PostgreSQL schema that holds the CDM tables, e.g. cdm (default: the search path)."),
]


def _fail(message: str) -> typer.Exit:
    console.print(f"[red]{escape(message)}[/red]")
    return typer.Exit(2)


def load(
    directory: Annotated[
        Path,
        typer.Argument(
            help="The folder you unzipped the Athena download into (CONCEPT.csv, CONCEPT_RELATIONSHIP.csv, ...).",
            show_default=False,
        ),
    ],
    db: DbOption,
    schema: SchemaOption = None,
) -> None:
    """Load an Athena vocabulary download into the OMOP database, replacing the vocabulary tables.

    Download the vocabularies your data uses from https://athena.ohdsi.org (at least SNOMED, LOINC,
    RxNorm, UCUM and, if your diagnoses are ICD-10 coded, ICD10CM or ICD10), unzip the file and point this
    command at the folder. CONCEPT.csv is required; VOCABULARY, DOMAIN, CONCEPT_CLASS, RELATIONSHIP,
    CONCEPT_RELATIONSHIP, CONCEPT_SYNONYM, CONCEPT_ANCESTOR and DRUG_STRENGTH are loaded when present.

    The CDM tables are created if the database has none yet. Each table is replaced in one transaction: if
    a file is broken or the database refuses it, that table keeps its previous rows and the command stops
    with the file, line and column at fault (exit status 2). Loading again replaces, never duplicates.

    Expect about 100,000 rows a second on a small server (see docs/benchmarks.md), so a full download
    with CONCEPT_ANCESTOR (tens of millions of rows) takes tens of minutes; memory stays below 200 MiB.
    Use PostgreSQL for a full vocabulary: SQLite holds it, but the file grows to several GiB.

    Load the vocabulary before the first ETL run: the ETL maps source codes (e.g. ICD-10-CM) to standard
    concepts through CONCEPT_RELATIONSHIP 'Maps to' rows, and without a vocabulary it uses the small subset
    bundled with twinfed (enough for the synthetic demo, not for real hospital data).
    """
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    from omop_etl.database import DatabaseUnavailable, check_database, open_engine, redact
    from omop_etl.vocabulary.athena import AthenaFormatError, VocabularyLoadError, find_athena_files, load_athena

    try:
        find_athena_files(directory)  # a wrong folder is reported before the database is touched
        check_database(db)  # says what to check when the server cannot be reached
        engine = open_engine(db, bulk_load=True)
    except (VocabularyLoadError, DatabaseUnavailable) as exc:
        raise _fail(f"Vocabulary not loaded. {exc}") from None
    console.print(f"Loading the vocabulary in [bold]{escape(str(directory))}[/bold] into {escape(redact(db))}")
    try:
        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=console,
            transient=True,
        ) as progress:
            task = progress.add_task("vocabulary files", total=None)

            def on_progress(done: int, total: int) -> None:
                progress.update(task, completed=done, total=total)

            result = load_athena(engine, directory, schema=schema, on_progress=on_progress)
    except (AthenaFormatError, VocabularyLoadError, DatabaseUnavailable) as exc:
        raise _fail(f"Vocabulary not loaded. {exc}") from None
    finally:
        engine.dispose()

    table = Table(title=f"Vocabulary loaded in {result.seconds:,.1f} s")
    table.add_column("table")
    table.add_column("rows", justify="right")
    table.add_column("seconds", justify="right")
    table.add_column("rows/s", justify="right")
    for name, rows in result.rows.items():
        seconds = result.table_seconds.get(name, 0.0)
        rate = f"{rows / seconds:,.0f}" if seconds > 0 else "-"
        table.add_row(name, f"{rows:,}", f"{seconds:,.1f}", rate)
    console.print(table)
    if result.missing:
        console.print(
            "[dim]Not in the folder, so those tables were left as they were: " + ", ".join(result.missing) + "[/dim]"
        )
    for note in result.notes:
        console.print(f"[yellow]{escape(note)}[/yellow]")


def status(db: DbOption, schema: SchemaOption = None) -> None:
    """Show which vocabulary the OMOP database holds: rows per table, concepts and version per vocabulary.

    Compare the versions with the other hospitals of your consortium: the same source code can map to a
    different standard concept in another release. Version 'twinfed bundled v1' means only the small
    subset shipped with twinfed is loaded; load your Athena download with `twinfed vocab load`.
    """
    from sqlalchemy import case, func, select
    from sqlalchemy import inspect as inspect_database
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import SQLAlchemyError

    from omop_etl.database import DatabaseUnavailable, normalise_url, open_engine, redact
    from omop_etl.schema import cdm_metadata
    from omop_etl.vocabulary.bundled import cdm_table

    try:
        engine = open_engine(db)
    except DatabaseUnavailable as exc:
        raise _fail(str(exc)) from None
    url = make_url(normalise_url(db))
    if url.get_backend_name() == "sqlite" and url.database and not Path(url.database).exists():
        raise _fail(f"There is no database file {url.database}. Check the --db URL (sqlite:///path/to/omop.sqlite).")
    metadata = cdm_metadata(schema)
    try:
        with engine.connect() as connection:
            present = set(inspect_database(connection).get_table_names(schema=schema))
            if "concept" not in present:
                where = f" (schema {schema})" if schema else ""
                raise _fail(
                    f"{redact(db)}{where} has no OMOP vocabulary tables. Load a vocabulary with "
                    "`twinfed vocab load FOLDER --db URL`, or check --db and --schema."
                )
            console.print(f"Vocabulary in {escape(redact(db))}" + (f", schema {escape(schema)}" if schema else ""))
            counts = Table(title="Rows per vocabulary table")
            counts.add_column("table")
            counts.add_column("rows", justify="right")
            for name in VOCABULARY_TABLES:
                if name in present:
                    table = cdm_table(metadata, name)
                    rows = connection.execute(select(func.count()).select_from(table)).scalar_one()
                    counts.add_row(name, f"{rows:,}")
                else:
                    counts.add_row(name, "[dim]no table[/dim]")
            console.print(counts)

            concept = cdm_table(metadata, "concept")
            per_vocabulary = {
                row.vocabulary_id: (row.concepts, row.standard)
                for row in connection.execute(
                    select(
                        concept.c.vocabulary_id,
                        func.count().label("concepts"),
                        func.sum(case((concept.c.standard_concept == "S", 1), else_=0)).label("standard"),
                    ).group_by(concept.c.vocabulary_id)
                )
            }
            described: dict[str, tuple[str, str]] = {}
            if "vocabulary" in present:
                vocabulary = cdm_table(metadata, "vocabulary")
                described = {
                    row.vocabulary_id: (row.vocabulary_name or "", row.vocabulary_version or "")
                    for row in connection.execute(
                        select(
                            vocabulary.c.vocabulary_id, vocabulary.c.vocabulary_name, vocabulary.c.vocabulary_version
                        )
                    )
                }
    except SQLAlchemyError as exc:
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        raise _fail(f"Cannot read the vocabulary from {redact(db)}: {reason}. Check --db and --schema.") from None
    finally:
        engine.dispose()

    release = described.get("None", ("", ""))[1]
    if release:
        console.print(f"Vocabulary release: [bold]{escape(release)}[/bold]")
    wide = console.width >= 120  # vocabulary names are long; show them where they fit
    vocabularies = Table(title="Vocabularies")
    vocabularies.add_column("vocabulary", no_wrap=True)
    if wide:
        vocabularies.add_column("name", max_width=40)
    vocabularies.add_column("version")
    vocabularies.add_column("concepts", justify="right", no_wrap=True)
    vocabularies.add_column("standard", justify="right", no_wrap=True)
    for vocabulary_id in sorted(set(per_vocabulary) | set(described), key=str.lower):
        concepts, standard = per_vocabulary.get(vocabulary_id, (0, 0))
        if vocabulary_id in described:
            name, version = (escape(v) for v in described[vocabulary_id])
        else:
            name, version = "", "[dim]no VOCABULARY row[/dim]"
        cells = [escape(vocabulary_id), *([name] if wide else []), version, f"{concepts:,}", f"{int(standard or 0):,}"]
        vocabularies.add_row(*cells)
    console.print(vocabularies)
    if not per_vocabulary:
        console.print("[yellow]The concept table is empty; load a vocabulary with `twinfed vocab load`.[/yellow]")


def map_codes(
    file: Annotated[
        Path,
        typer.Argument(
            help="The CSV Usagi writes with File > Export source_to_concept_map (or a file with the same columns).",
            show_default=False,
        ),
    ],
    db: DbOption,
    schema: SchemaOption = None,
    system: Annotated[
        str | None,
        typer.Option(
            "--system",
            help="The FHIR Coding.system URI these local codes arrive with (e.g. http://aster.example.org/lab). "
            "Registered for the vocabulary id, so the ETL maps codes of that system through these rows.",
        ),
    ] = None,
    vocabulary_id: Annotated[
        str | None,
        typer.Option(
            "--vocabulary-id",
            help="The source_vocabulary_id of the local codes (at most 20 characters, e.g. ASTER-LAB): fills empty "
            "source_vocabulary_id cells, and rows naming another id are rejected. Needed with --system when the "
            "file holds several vocabularies.",
        ),
    ] = None,
) -> None:
    """Load the hospital's own code mappings (local code -> standard concept) into source_to_concept_map.

    The file has the OMOP columns source_code, source_concept_id, source_vocabulary_id,
    source_code_description, target_concept_id, target_vocabulary_id, valid_start_date, valid_end_date and
    invalid_reason, as Usagi's "Export source_to_concept_map" writes them (only source_code,
    source_vocabulary_id and target_concept_id are required).

    Every row is checked: the fields the CDM requires, dates (YYYY-MM-DD, start before end), and, when the
    database holds the target's vocabulary, that the target concept exists, is standard and is valid. A bad
    row is listed with the file, the line and the rule it broke; the good rows still load, in one
    transaction. Loading the file again replaces the earlier rows of its codes, never duplicates them.

    FHIR codes of a system twinfed does not know (your lab's own code system) are mapped through these rows
    once you name the system: --system URI --vocabulary-id ID records it in the vocabulary table
    (vocabulary_reference). A system of at most 20 characters also works without registration when it is
    the source_vocabulary_id itself. The next `twinfed etl` counts the events it mapped this way. Exit
    status 1 when rows were rejected, 2 when the file or the database cannot be used (nothing loaded).
    """
    from omop_etl.database import DatabaseUnavailable
    from omop_etl.vocabulary.source_map import SourceMapError, load_source_to_concept_map

    try:
        report = load_source_to_concept_map(db, file, schema, vocabulary_id=vocabulary_id, system=system)
    except (SourceMapError, DatabaseUnavailable) as exc:
        raise _fail(f"Mappings not loaded. {exc}") from None
    replaced = f", replacing {report.replaced:,} loaded earlier" if report.replaced else ""
    console.print(
        f"{escape(file.name)}: {report.rows_read:,} rows read, [bold]{report.loaded:,} loaded[/bold]{replaced}, "
        f"{len(report.rejected):,} rejected ({escape(report.database)})."
    )
    if report.created_tables:
        console.print(f"Created the table(s) {', '.join(report.created_tables)}.")
    if report.by_vocabulary:
        table = Table(title="Loaded per source vocabulary")
        table.add_column("source_vocabulary_id")
        table.add_column("rows", justify="right")
        for name, rows in sorted(report.by_vocabulary.items()):
            table.add_row(escape(name), f"{rows:,}")
        console.print(table)
    if report.registered_system:
        console.print(
            f"FHIR codes of {escape(report.registered_system)} are now mapped as vocabulary "
            f"{escape(report.registered_vocabulary_id or '')} (recorded in the vocabulary table)."
        )
    if report.to_no_concept:
        console.print(
            f"{report.to_no_concept:,} row(s) map to concept 0 (no standard concept): those codes stay unmapped."
        )
    if report.unchecked_targets:
        console.print(
            f"[yellow]{report.unchecked_targets:,} target concept(s) are of vocabularies this database holds no "
            "concepts of, so they could not be checked; load the Athena vocabulary to check them.[/yellow]"
        )
    if report.several_targets:
        console.print(
            f"{report.several_targets:,} source code(s) map to more than one concept; the ETL uses the lowest "
            "concept id of each."
        )
    for rejected in report.rejected[:50]:
        Console(stderr=True, soft_wrap=True).print(rejected.message, markup=False, highlight=False)
    if len(report.rejected) > 50:
        Console(stderr=True).print(f"... and {len(report.rejected) - 50:,} more rejected rows.", markup=False)
    if report.rejected:
        raise typer.Exit(1)


vocab_app.command("load")(load)
vocab_app.command("status")(status)
vocab_app.command("map")(map_codes)
