"""Reading the YAML of configs, overrides and the experiment table: a key given twice is refused, and
every failure is a ConfigError that names the file or the override. Imports stdlib and yaml only
(mic_config, mic_experiments and mic_eval read YAML through it)."""
import typing

import yaml


class ConfigError(ValueError):
    """A config value, override or file that cannot be used; the message names the key or the file."""


class _Loader(yaml.SafeLoader):
    """Refuses a key given twice in one mapping (PyYAML keeps the last: of two `train:` sections, one)."""

    def construct_mapping(self, node, deep=False):
        nodes = {}  # key -> the node where it first appears
        for key_node, _ in node.value:
            if key_node.tag == 'tag:yaml.org,2002:merge':  # '<<: *base' may be repeated and overridden
                continue
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, typing.Hashable) and nodes.setdefault(key, key_node) is not key_node:
                lines = f'lines {nodes[key].start_mark.line + 1} and {key_node.start_mark.line + 1}'
                raise yaml.constructor.ConstructorError(  # only a problem: its text is one line
                    problem=f'key {key!r} is given twice ({lines}): the second would silently replace the first')
        return super().construct_mapping(node, deep)


def parse_override(text):
    """'a.b.c=value' -> ('a.b.c', value) with the value read as YAML (null, 3, 1e-4, [1, 2], text)."""
    if '=' not in text:
        raise ConfigError(f'override {text!r} must look like key.sub=value')
    key, raw = text.split('=', 1)
    try:
        return key.strip(), yaml.load(raw, Loader=_Loader) if raw.strip() else ''
    except yaml.YAMLError as e:
        raise ConfigError(f'override {text!r}: the value is not valid YAML ({e})') from None


def read_yaml(path, what, missing_hint=''):
    """The YAML document at `path` ({} when empty), or ConfigError '<what> ...' saying what is wrong."""
    try:
        with open(path, 'rb') as f:
            data = f.read()
        text = data.decode('utf-8')
        if '\0' in text:  # UTF-16 text or a binary file: a NUL byte is valid UTF-8, but never in YAML
            raise UnicodeDecodeError('utf-8', data, data.index(b'\0'), data.index(b'\0') + 1, 'NUL byte')
        return yaml.load(text, Loader=_Loader) or {}
    except FileNotFoundError:
        raise ConfigError(f'{what} does not exist{missing_hint}') from None
    except IsADirectoryError:
        raise ConfigError(f'{what} is a folder, not a YAML file') from None
    except OSError as e:
        raise ConfigError(f'{what} cannot be read: {e.strerror or e}') from None
    except UnicodeDecodeError as e:
        raise ConfigError(f'{what} is not UTF-8 text (byte {e.start}: a binary file, or another encoding such as '
                          f'UTF-16); save it as UTF-8') from None
    except yaml.YAMLError as e:
        raise ConfigError(f'{what} is not valid YAML: {e}') from None
