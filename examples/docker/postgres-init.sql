-- Demo database for docker-compose.yml: a shop, and a least-privilege CDC role.
CREATE DATABASE shop;
\connect shop
CREATE TABLE customers (id serial PRIMARY KEY, name text NOT NULL, email text);
CREATE TABLE orders (id serial PRIMARY KEY, customer_id int REFERENCES customers, total numeric(10,2),
                     status text DEFAULT 'new', created_at timestamptz DEFAULT now());
CREATE ROLE cdc WITH LOGIN REPLICATION PASSWORD 'cdc';
GRANT USAGE ON SCHEMA public TO cdc;
GRANT SELECT ON ALL TABLES IN SCHEMA public TO cdc;
-- FOR ALL TABLES needs a superuser: created here, so tailgate runs without one.
CREATE PUBLICATION tailgate_shop FOR ALL TABLES;
