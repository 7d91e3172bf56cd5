/*
 * A launcher for a shared-library CPython: `cargo xtask bootstrap` (xtask/src/roots.rs)
 * links it against a Debian root's libpython3.X.so.1.0 as /usr/bin/python3.X-shared, since
 * Debian's own /usr/bin/python3.X have libpython linked in statically.
 *
 * No Python headers: Py_BytesMain (3.8+) is all it needs, and is what python.c calls.
 */
int Py_BytesMain(int argc, char **argv);

int main(int argc, char **argv)
{
    return Py_BytesMain(argc, argv);
}
