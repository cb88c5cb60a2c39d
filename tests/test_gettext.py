"""gettext catalogs as a corpus (pipeline.sources, kind: gettext): .po and .mo files read through
polib; plurals, contexts, fuzzy and obsolete entries, templates and help text handled and counted
by reason; one id for every copy of a message, whichever catalog it is in."""
from __future__ import annotations

import re

import polib
import pytest

from pipeline.config import GettextSource, ParamsError, load_params
from pipeline.corpus import ingest
from pipeline.sources import CorpusError
from tests.conftest import REPO


def catalog(entries: list[polib.POEntry], plural_forms: str = "nplurals=2; plural=(n != 1);") -> polib.POFile:
    po = polib.POFile()
    po.metadata = {"Language": "es", "Content-Type": "text/plain; charset=UTF-8", "Plural-Forms": plural_forms}
    for entry in entries:
        po.append(entry)
    return po


def entry(msgid: str, msgstr: str = "", **fields) -> polib.POEntry:
    return polib.POEntry(msgid=msgid, msgstr=msgstr, **fields)


ENTRIES = [
    entry("The file could not be opened.", "No se pudo abrir el archivo."),
    entry("Open", "Abrir", msgctxt="verb"),
    entry("Save changes before closing?\n", "¿Guardar los cambios antes de cerrar?\n"),  # trailing newlines
    entry("_Quit the program", "_Salir del programa"),  # accelerators
    entry("&Print the page", "&Imprimir la página"),
    entry("Tom && Jerry went home", "Tom && Jerry se fueron a casa"),  # a literal "&", not an accelerator
    entry("One file was deleted", msgid_plural="Many files were deleted",
          msgstr_plural={0: "Se borró un archivo", 1: "Se borraron muchos archivos"}),
    entry("Cannot open %s", "No se puede abrir %s"),  # templates
    entry("Copied %1$d of %2$d", "Copiados %1$d de %2$d"),
    entry("Hello {name}", "Hola {name}"),
    entry("Your home is $HOME", "Tu carpeta es $HOME"),
    entry("  -h, --help     show this help", "  -h, --help     muestra esta ayuda"),  # help columns
    entry("First line\nSecond line", "Primera línea\nSegunda línea"),  # several lines
    entry("Old message kept", "Mensaje antiguo", flags=["fuzzy"]),
    entry("Not translated yet", ""),
    entry("Gone from the program", "Ya no está", obsolete=True),
    entry("It cost 100% of the budget.", "Costó el 100% del presupuesto."),  # a percent sign is text
    entry("Done.  Restart now.", "Hecho.  Reinicie ahora."),  # two spaces: a sentence end
]


def read(path, **fields):
    return ingest([GettextSource(name="catalogs", path=str(path), **fields)], 80, 3.0)


@pytest.mark.parametrize("suffix", [".po", ".mo"])
def test_messages_become_pairs_and_the_rest_is_counted(tmp_path, suffix):
    path = tmp_path / f"app{suffix}"
    po = catalog(ENTRIES)
    po.save(str(path)) if suffix == ".po" else po.save_as_mofile(str(path))
    pairs, report = read(path)
    got = dict(zip(pairs["src"], pairs["tgt"]))
    assert got == {
        "The file could not be opened.": "No se pudo abrir el archivo.",
        "Open": "Abrir",
        "Save changes before closing?": "¿Guardar los cambios antes de cerrar?",
        "Quit the program": "Salir del programa",
        "Print the page": "Imprimir la página",
        "Tom && Jerry went home": "Tom && Jerry se fueron a casa",
        "One file was deleted": "Se borró un archivo",
        "Many files were deleted": "Se borraron muchos archivos",
        "It cost 100% of the budget.": "Costó el 100% del presupuesto.",
        "Done. Restart now.": "Hecho. Reinicie ahora.",
    }
    dropped = {"format_string": 4, "options_text": 1, "multi_line": 1}
    if suffix == ".po":  # msgfmt's .mo holds neither fuzzy, untranslated nor obsolete messages
        dropped |= {"fuzzy_translation": 1, "untranslated": 1, "obsolete_entry": 1}
    assert report["dropped"] == dropped
    assert report["repaired"]["trailing_newline"] == 1 and report["repaired"]["accelerator"] == 2
    assert report["gettext_catalogs"] == {str(path): {"language": "es", "pairs": 10, "debian": None}}
    assert report["examples"]["format_string"][0] == f"{path}: msgid 'Cannot open %s'"


def test_plurals_beyond_two_forms_keep_the_singular_only(tmp_path):
    path = tmp_path / "pl.po"
    catalog([entry("One file", msgid_plural="Many files", msgstr_plural={0: "Jeden plik", 1: "Dwa pliki", 2: "Wiele plików"})],
            plural_forms="nplurals=3; plural=(n==1 ? 0 : n%10>=2 && n%10<=4 ? 1 : 2);").save(str(path))
    pairs, _ = read(path)
    assert list(zip(pairs["src"], pairs["tgt"])) == [("One file", "Jeden plik")]


def test_one_message_has_one_id_across_catalogs(tmp_path):
    """The same message in two catalogs, translated two ways and one with an accelerator: one id, so
    one split; the first catalog's translation is kept and the other counted."""
    catalog([entry("Open the door", "Abrir la puerta"), entry("Close", "Cerrar")]).save(str(tmp_path / "a.po"))
    catalog([entry("_Open the door", "Abre la puerta"), entry("Close", "Cerrar")]).save(str(tmp_path / "b.po"))
    pairs, report = read(tmp_path)
    assert list(zip(pairs["src"], pairs["tgt"])) == [("Open the door", "Abrir la puerta"), ("Close", "Cerrar")]
    assert report["dropped"] == {"duplicate": 1, "duplicate_id": 1}
    assert all(i.startswith("catalogs:") for i in pairs["id"])


def test_a_folder_reads_the_named_catalogs_in_their_order(tmp_path):
    catalog([entry("Alpha", "Alfa")]).save_as_mofile(str(tmp_path / "a.mo"))
    catalog([entry("Beta", "Beta es")]).save(str(tmp_path / "b.po"))
    catalog([entry("Gamma", "Gama")]).save(str(tmp_path / "c.po"))
    pairs, _ = read(tmp_path, catalogs=["c", "a"])
    assert list(pairs["src"]) == ["Gamma", "Alpha"]
    with pytest.raises(CorpusError, match=r"no catalog 'zz' \(found: a, b, c\)"):
        read(tmp_path, catalogs=["zz"])


@pytest.mark.parametrize("content", [b"not a catalog at all", b"", b"\xde\x12\x04\x95\x00"])
def test_unreadable_catalog_names_the_file(tmp_path, content):
    path = tmp_path / "broken.mo"
    path.write_bytes(content)  # garbage, empty, truncated after the magic number
    with pytest.raises(CorpusError, match=rf"{path}: cannot read as a gettext catalog"):
        read(path)
    with pytest.raises(CorpusError, match=rf"{tmp_path / 'nowhere'}: no gettext catalog"):
        read(tmp_path / "nowhere")


def test_params_take_a_gettext_source(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("ingest:\n  sources:\n    - {kind: gettext, path: /usr/share/locale/es/LC_MESSAGES, "
                                          "catalogs: [apt]}\n")
    source = load_params().ingest.sources[0]
    assert isinstance(source, GettextSource) and source.catalogs == ["apt"]
    (tmp_path / "params.yaml").write_text("ingest:\n  sources:\n    - {kind: gettext}\n")
    with pytest.raises(ParamsError, match=r"ingest\.sources\.0\.gettext\.path"):
        load_params()


def test_a_catalog_from_a_debian_package_is_named_with_its_version(tmp_path):
    """apt is on every Debian machine, and ships its Spanish catalog."""
    import subprocess

    path = "/usr/share/locale/es/LC_MESSAGES/apt.mo"
    version = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", "apt"], capture_output=True, text=True).stdout
    _, report = read(path)
    assert report["gettext_catalogs"][path]["debian"] == {"package": "apt", "version": version}
    assert version and report["gettext_catalogs"][path]["pairs"] > 100


def test_a_catalog_from_a_package_the_source_does_not_name_stops_ingest():
    path = "/usr/share/locale/es/LC_MESSAGES/apt.mo"
    assert read(path, packages=["apt", "dpkg"])[1]["gettext_catalogs"][path]["debian"]["package"] == "apt"
    with pytest.raises(CorpusError, match=rf"{path}: installed by the Debian package 'apt', which .*packages "
                                          r"does not name \(dpkg\)"):
        read(path, packages=["dpkg"])


def test_a_catalog_no_package_installed_passes_the_package_check(tmp_path):
    """Only what dpkg says is checked: a project's own .po, or a host without dpkg, reads as usual."""
    path = tmp_path / "app.po"
    catalog(ENTRIES).save(str(path))
    _, report = read(path, packages=["dpkg"])
    assert report["gettext_catalogs"][str(path)]["debian"] is None and report["gettext_catalogs"][str(path)]["pairs"]


@pytest.mark.parametrize("src, tgt, pair", [
    ("Save _As", "Guardar co_mo", ("Save As", "Guardar como")),  # the translator's own place
    ("_File", "文件(_F)", ("File", "文件")),  # bracketed, as CJK catalogs write it
    ("Invalid max_size value", "Valor max_size no válido", ("Invalid max_size value", "Valor max_size no válido")),
    ("Symbol _SDA_BASE_ is missing", "Falta el símbolo _SDA_BASE_",
     ("Symbol _SDA_BASE_ is missing", "Falta el símbolo _SDA_BASE_")),
    ("Fish &amp; chips", "Pescado &amp; patatas", ("Fish &amp; chips", "Pescado &amp; patatas")),
    ("Disk 100%% full", "Disco lleno al 100%%", ("Disk 100% full", "Disco lleno al 100%")),
])
def test_accelerators_go_and_identifiers_stay(tmp_path, src, tgt, pair):
    catalog([entry(src, tgt)]).save(str(tmp_path / "a.po"))
    pairs, _ = read(tmp_path / "a.po")
    assert list(zip(pairs["src"], pairs["tgt"])) == [pair]


@pytest.mark.parametrize("template", ["Read %.*s", "Failed: %m", "Size %<PRIu64>", "Deleted %1 files",
                                      "Copied %L1 items", "Value {0!r}"])
def test_more_templates_are_dropped(tmp_path, template):
    catalog([entry(template, template + " es")]).save(str(tmp_path / "a.po"))
    with pytest.raises(CorpusError, match=r"no pairs left.*'format_string': 1"):
        read(tmp_path / "a.po")


def test_a_folder_reads_each_catalog_once_and_an_empty_one_is_an_error(tmp_path):
    po = catalog([entry("Alpha", "Alfa")])
    po.save(str(tmp_path / "a.po"))
    po.save_as_mofile(str(tmp_path / "a.mo"))
    pairs, report = read(tmp_path)
    assert list(pairs["src"]) == ["Alpha"] and list(report["gettext_catalogs"]) == [str(tmp_path / "a.mo")]
    (tmp_path / "empty").mkdir()
    with pytest.raises(CorpusError, match=rf"{tmp_path / 'empty'}: no gettext catalog here"):
        read(tmp_path / "empty")


def test_set_up_installs_every_package_the_default_corpus_names():
    """A fresh clone must read the catalogs the committed lock read: scripts/setup.sh installs them."""
    setup = (REPO / "scripts/setup.sh").read_text()
    installed = {name for line in re.findall(r"^apt_packages\+?=\(([^)]*)\)", setup, re.M) for name in line.split()}
    named = {package for source in load_params(REPO / "params.yaml").ingest.sources
             if isinstance(source, GettextSource) for package in source.packages or []}
    assert named and named <= installed, sorted(named - installed)
