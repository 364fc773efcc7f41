-- Run once by the postgres image on an empty volume, as POSTGRES_USER, after it created POSTGRES_DB (the
-- service's own tables). Optuna's tables get a database of their own: its table names are generic and it
-- keeps its own Alembic version table. `esgd migrate` then creates the tables in both.
CREATE DATABASE optuna;
